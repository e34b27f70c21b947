"""The SSAH part of a saved adapter's model card (``README.md``): what the adapter is, built from its config alone.

peft's ``PeftModel.save_pretrained`` writes (or updates) ``README.md`` in the save directory and then saves each
adapter's config, the ``"default"`` adapter's in that directory and every other one in a subfolder named after it.
:meth:`ssah_peft.SSAHConfig.save_pretrained` then calls :func:`update_model_card`, which adds the adapter's section
to that README: the method and mode, how many units it trains and freezes (its budget, a share of all the model's
units), how its unit map was made and which weights the adapter and the map belong to. Each section sits between
markers naming its adapter and is replaced on the next save, so re-saving changes nothing else and every adapter
of a multi-adapter save has its own section; peft's own card content is kept.

An adapter made by ``ssah-peft finetune`` also gets its before/after safety table (:func:`add_safety_table`).
``push_to_hub`` writes the card that transformers / peft build there, not this one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .._files import write_text

if TYPE_CHECKING:
    from .config import SSAHConfig

CARD_NAME = "README.md"
DEFAULT_DELTA_DTYPE = "float32 for fp16/bf16 bases, else the base dtype"
MODE_DESCRIPTIONS = {
    "protect": (
        "a low-rank update B·A (r={r}, alpha={alpha:g}) of every weight of the targeted blocks except the slices of "
        "the protected units, which stay exactly as in the base model (the paper's \"freeze the safety-critical "
        'units" fine-tuning)'
    ),
    "select": (
        "a dense update of the slices of the selected units only; every other weight stays exactly as in the base "
        'model (the paper\'s "redundant units" budget)'
    ),
}


def update_model_card(config_directory: str | Path, config: SSAHConfig) -> Path:
    """Add or replace the section of the adapter saved in ``config_directory`` in its model card; returns the card.

    The card is ``README.md`` in ``config_directory`` (the ``"default"`` adapter, or a config saved on its own: a
    card is created if there is none), or for an adapter that peft saved in a subfolder, the peft card of the save
    directory above it (its front matter says ``library_name: peft``), where the section is named after the folder.
    """
    directory = Path(config_directory)
    card, name = directory / CARD_NAME, "default"
    parent_card = directory.parent / CARD_NAME
    if not card.exists() and _is_peft_card(parent_card):
        card, name = parent_card, directory.name
    return replace_section(card, f"adapter {json.dumps(name)}", adapter_section(name, config))


def add_safety_table(adapter_directory: str | Path, table: Sequence[str]) -> Path:
    """Add or replace the "Safety before and after" section of the card of an adapter made by a fine-tuning job
    (``table``: the Markdown lines of the job report's before/after table); returns the card."""
    body = "\n".join(["## Safety before and after", "", *table]).rstrip() + "\n"
    return replace_section(Path(adapter_directory) / CARD_NAME, "safety", body)


def replace_section(card: Path, key: str, body: str) -> Path:
    """Put ``body`` between the markers of ``key`` in ``card``: in place of the section a previous save wrote, or
    at the end; the rest of the card is kept as it is."""
    begin, end = f"<!-- ssah-peft {key} -->", f"<!-- /ssah-peft {key} -->"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = f"{text.rstrip()}\n\n{section}" if text.strip() else section
    return write_text(card, text.rstrip() + "\n")  # one final newline, however the card's last writer ended it


def adapter_section(name: str, config: SSAHConfig) -> str:
    """The Markdown section that describes one SSAH adapter."""
    description = MODE_DESCRIPTIONS[config.mode].format(r=config.r, alpha=config.alpha)
    lines = [
        f"## SSAH adapter `{name}`",
        "",
        f"Method **SSAH** (Superficial Safety Alignment Hypothesis, Li & Kim), mode **{config.mode}**: {description}.",
        "",
        *_unit_lines(config),
        "",
        f"- target blocks: {', '.join(config.target_blocks)}; layers: {_layers(config.layers_to_transform)}; "
        f"unit parts: {config.unit_parts}",
        f"- dropout: {config.dropout:g}; delta dtype: {config.delta_dtype or DEFAULT_DELTA_DTYPE}",
        "",
        "### Unit map",
        "",
        *_unit_map_lines(config.unit_map_settings),
        "",
        "### Weights",
        "",
        *_weight_lines(config),
    ]
    return "\n".join(lines)


def unit_counts(config: SSAHConfig) -> Optional[dict[str, int]]:
    """``{"total", "trained", "frozen", "named"}``: all units of the model, those the adapter trains, the rest, and
    the units its config names (protected or selected); ``None`` before the adapter met a model (no shapes)."""
    if config.model_shapes is None:
        return None
    widths = config.model_shapes["widths"]
    layers = range(config.model_shapes["num_layers"])
    if config.layers_to_transform is not None:
        layers = [layer for layer in layers if layer in set(config.layers_to_transform)]
    total = sum(sum(per_layer) for per_layer in widths.values())
    named = sum(len(config.units_of(layer, kind)) for layer in layers for kind in config.target_blocks)
    if config.mode == "select":
        trained = named
    else:
        trained = sum(widths[kind][layer] for layer in layers for kind in config.target_blocks) - named
    return {"total": total, "trained": trained, "frozen": total - trained, "named": named}


def _unit_lines(config: SSAHConfig) -> list[str]:
    counts = unit_counts(config)
    if counts is None:
        return ["Unit counts are recorded once the adapter has been applied to a model."]
    total = counts["total"]
    named = "protected (frozen)" if config.mode == "protect" else "selected (trained)"
    lines = [
        "| units | count | share of all units |",
        "|---|---:|---:|",
        *(
            f"| {what} | {counts[key]:,} | {_share(counts[key], total)} |"
            for what, key in (("trained", "trained"), ("frozen", "frozen"), (named, "named"))
        ),
        f"| all units of the model | {total:,} | 100% |",
        "",
        f"Budget: the adapter trains {_share(counts['trained'], total)} of all units.",
    ]
    if config.mode == "protect" and config.unit_parts == "out_proj":
        lines.append("With unit parts `out_proj`, only the output-projection column of a protected unit is frozen.")
    return lines


def _unit_map_lines(settings: Optional[Mapping[str, Any]]) -> list[str]:
    if not settings:
        return ["The units were given directly, not from a unit map."]
    lines = []
    classification = settings.get("classification") or {}
    if classification:
        shown = ", ".join(f"{key}={value}" for key, value in classification.items())
        lines.append(f"- classification: {shown}; composite fraction {settings.get('composite_fraction', 0):g}")
    for side, info in (settings.get("calibration") or {}).items():
        shown = ", ".join(f"{key}={value}" for key, value in info.items())
        lines.append(f"- {side} scores: {shown}")
    return lines or ["The unit map recorded no settings."]


def _weight_lines(config: SSAHConfig) -> list[str]:
    lines = []
    if config.base_model_name_or_path:
        lines.append(f"- base model: `{config.base_model_name_or_path}`")
    if config.model_shapes is not None:
        blocks = (config.architecture or {}).get("blocks", {})
        projections = ", ".join(f"`{block['out_proj']}`" for block in blocks.values())
        where = f"; a unit is an input channel of {projections}" if projections else ""
        lines.append(f"- the adapter was made on: {_shapes(config.model_shapes)}{where}")
    if config.weight_sample is not None:
        values = sum(len(entry.get("values", ())) for entry in config.weight_sample.get("weights", ()))
        lines.append(
            f"- a sample of {values} of its weights is stored in adapter_config.json: loading the adapter into "
            "other weights of the same shapes is refused"
        )
    if config.unit_map_fingerprint is not None:
        fingerprint = config.unit_map_fingerprint
        lines.append(
            f"- the unit map was scored on: model_type={fingerprint.get('model_type')!r}, {_shapes(fingerprint)}"
        )
    return lines or ["The adapter has not been applied to a model yet: no shapes or weights are recorded."]


def _shapes(shapes: Mapping[str, Any]) -> str:
    widths = "; ".join(
        f"{kind} {', '.join(str(w) for w in sorted(set(per_layer)))}" for kind, per_layer in shapes["widths"].items()
    )
    return f"{shapes['num_layers']} layers, hidden sizes {shapes['hidden_sizes']}, block widths {widths}"


def _layers(layers: Optional[list[int]]) -> str:
    return "all" if layers is None else ", ".join(str(layer) for layer in layers)


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.2f}%" if total else "-"


def _is_peft_card(card: Path) -> bool:
    """Whether ``card`` is a model card peft wrote (its YAML front matter says ``library_name: peft``)."""
    if not card.is_file():
        return False
    front_matter = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8"), flags=re.DOTALL)
    return front_matter is not None and re.search(r"^library_name:\s*peft\s*$", front_matter.group(1), re.M) is not None
