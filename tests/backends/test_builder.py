"""The metadata builder mixin keeps the stock builder's contract: its capture and block-table
methods work on stock metadata and come back wrapped (a stand-in stock builder, no engine)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from rlkv_vllm.backends.common import RLKVBuilderMixin, RLKVMetadata
from rlkv_vllm.ops.pools import TorchPool


class StandInStockBuilder:
    """What vLLM's TRITON_ATTN / FLASH_ATTN builders do around ``self.build``."""

    supports_update_block_table = True

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        pass

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        cm = common_attn_metadata
        return SimpleNamespace(seq_lens=cm.seq_lens, block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        md = self.build(0, common_attn_metadata)
        md.seq_lens.fill_(1)  # TRITON_ATTN: capture is slow at max_model_len
        return md

    def update_block_table(self, metadata, blk_table, slot_mapping):
        new = copy.copy(metadata)
        new.block_table, new.slot_mapping = blk_table, slot_mapping
        return new


class StandInRuntime:
    def __init__(self) -> None:
        self.settings = SimpleNamespace(sink=2, recent=3)
        self.plan = SimpleNamespace(max_num_seqs=4, num_slots=4, shape=SimpleNamespace(head_size=8))
        self.pool = TorchPool()

    def slot_ids_on_device(self, n):
        return torch.arange(n, dtype=torch.int32)

    def cached_step_value(self, key, make):
        return make()


class Builder(RLKVBuilderMixin, StandInStockBuilder):
    def _rlkv_find_runtime(self, kv_cache_spec, layer_names, vllm_config) -> None:
        self.rlkv_runtime = StandInRuntime()
        self._rlkv_spec = kv_cache_spec


def _common(n_reqs=2):
    return SimpleNamespace(
        num_reqs=n_reqs, num_actual_tokens=n_reqs, max_query_len=1,
        query_start_loc=torch.arange(n_reqs + 1, dtype=torch.int32), seq_lens=torch.tensor([5, 9], dtype=torch.int32),
        slot_mapping=torch.tensor([3, 7]), block_table_tensor=torch.zeros(2, 4, dtype=torch.int32),
    )


def test_capture_lets_the_stock_builder_adjust_its_metadata():
    builder = Builder(SimpleNamespace(head_size=8), ["layers.0.self_attn"], None, torch.device("cpu"))
    cm = _common()
    md = builder.build_for_cudagraph_capture(cm)
    assert isinstance(md, RLKVMetadata) and isinstance(md.full, SimpleNamespace)
    assert md.full.seq_lens.tolist() == [1, 1]
    assert md.rows.seq_lens.data_ptr() == cm.seq_lens.data_ptr()  # the same persistent buffer
    assert md.step_plan is not None  # the torch pool's plan
    assert not builder._rlkv_stock_call


def test_placeholder_group_builds_no_stock_metadata():
    builder = Builder(SimpleNamespace(head_size=1), ["layers.1.self_attn"], None, torch.device("cpu"))
    md = builder.build_for_cudagraph_capture(_common())
    assert md.full is None and md.rows.seq_lens.tolist() == [5, 9]


def test_update_block_table_updates_the_stock_part_and_the_rows():
    builder = Builder(SimpleNamespace(head_size=8), ["layers.0.self_attn"], None, torch.device("cpu"))
    md = builder.build(0, _common())
    blk, slots = torch.ones(2, 4, dtype=torch.int32), torch.tensor([11, 12])
    new = builder.update_block_table(md, blk, slots)
    assert isinstance(new, RLKVMetadata)
    assert new.full.block_table is blk and new.full.slot_mapping is slots and new.rows.slot_mapping is slots
    assert md.rows.slot_mapping.tolist() == [3, 7]  # the cached metadata is left as it was
