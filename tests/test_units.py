"""Units → weight slices: the architecture table, GQA/head sharing rules, fused and transposed layouts."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, tiny_config

from ssah_peft.units import ArchitectureSpec, BlockSpec, ProjectionPart, resolve_architecture, unit_slices


def _ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


def test_llama_gqa_slices_by_rule() -> None:
    # 4 query heads of head_dim 8 over 2 kv heads: kv head 0 serves query heads 0 and 1.
    spec = resolve_architecture(tiny_config("llama"))
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 8)
    units = torch.tensor(list(range(8)) + [12])  # all of head 0, channel 4 of head 1
    any_rule = unit_slices(spec, "attn", units, width=32, rule="any")
    assert any_rule["self_attn.o_proj"][0] == "in"
    assert _ids(any_rule["self_attn.o_proj"][1]) == list(range(8)) + [12]
    assert _ids(any_rule["self_attn.q_proj"][1]) == list(range(16))  # heads 0 and 1 are touched
    assert _ids(any_rule["self_attn.k_proj"][1]) == list(range(8))  # kv head 0
    assert _ids(any_rule["self_attn.v_proj"][1]) == list(range(8))  # kv channels 0..7 of kv head 0
    all_rule = unit_slices(spec, "attn", units, width=32, rule="all")
    assert _ids(all_rule["self_attn.q_proj"][1]) == list(range(8))  # only head 0 is complete
    assert "self_attn.k_proj" not in all_rule  # kv head 0 also serves head 1, which is incomplete
    assert _ids(all_rule["self_attn.v_proj"][1]) == [4]  # channel 4 of heads 0 and 1 are both in the set


def test_without_gqa_value_rows_are_owned() -> None:
    spec = resolve_architecture(tiny_config("llama", num_key_value_heads=4))
    slices = unit_slices(spec, "attn", torch.tensor([3, 17]), width=32, rule="all")
    assert _ids(slices["self_attn.v_proj"][1]) == [3, 17]
    assert "self_attn.q_proj" not in slices and "self_attn.k_proj" not in slices


def test_mlp_rows_and_columns_and_out_proj_only() -> None:
    spec = resolve_architecture(tiny_config("llama"))
    units = torch.tensor([5, 1, 40])
    slices = unit_slices(spec, "mlp", units, width=48, rule="all")
    assert slices["mlp.down_proj"][0] == "in" and _ids(slices["mlp.down_proj"][1]) == [1, 5, 40]
    for name in ("mlp.gate_proj", "mlp.up_proj"):
        assert slices[name][0] == "out" and _ids(slices[name][1]) == [1, 5, 40]
    assert set(unit_slices(spec, "mlp", units, 48, "all", parts="out_proj")) == {"mlp.down_proj"}


def test_phi3_fused_offsets() -> None:
    spec = resolve_architecture(tiny_config("phi3"))
    mlp = unit_slices(spec, "mlp", torch.tensor([2, 7]), width=48, rule="any")
    assert _ids(mlp["mlp.gate_up_proj"][1]) == [2, 7, 48 + 2, 48 + 7]  # gate rows, then up rows
    attn = unit_slices(spec, "attn", torch.arange(16), width=32, rule="all")  # query heads 0 and 1 = kv head 0
    qkv = _ids(attn["self_attn.qkv_proj"][1])
    assert qkv == list(range(16)) + list(range(32, 40)) + list(range(48, 56))  # q rows, k rows, v rows


def test_gpt2_fused_conv1d() -> None:
    spec = resolve_architecture(tiny_config("gpt2"))
    assert spec.conv1d and spec.layers == "h"
    attn = unit_slices(spec, "attn", torch.tensor([9]), width=32, rule="any")
    assert _ids(attn["attn.c_attn"][1]) == list(range(8, 16)) + list(range(32 + 8, 32 + 16)) + [64 + 9]
    assert _ids(attn["attn.c_proj"][1]) == [9]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves_and_round_trips(family: str) -> None:
    spec = resolve_architecture(tiny_config(family))
    assert ArchitectureSpec.from_dict(spec.to_dict()) == spec


def test_unknown_architecture_names_what_to_add() -> None:
    config = tiny_config("llama")
    config.model_type = "mystery"
    with pytest.raises(NotImplementedError, match="ARCHITECTURES.*ArchitectureSpec"):
        resolve_architecture(config)


def test_spec_rejects_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match="sharing"):
        ArchitectureSpec(
            layers="layers",
            blocks={"mlp": BlockSpec("mlp.down", (ProjectionPart("mlp.up", sharing="rows"),))},
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        )
    with pytest.raises(ValueError, match="multiple"):
        ArchitectureSpec(layers="layers", blocks={}, num_heads=4, num_kv_heads=3, head_dim=8)
