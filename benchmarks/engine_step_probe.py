"""Where a decoding step of the engine spends its time, on the 32B's layer shapes (GPU only).

Builds `--layers` layers of the 32B architecture (NF4 + random LoRA, then `for_decoding`:
dequantised once, LoRA unmerged), fills `--slots` slots with contexts of random length in
[`--min-context`, `--max-context`], and times: the decode step eagerly and as a CUDA graph, the
attention kernel alone for one layer, and the bare bf16 products of one layer's projections; the
graph step is timed again with the LoRA branches in line instead of on the side stream; and one
LoRA-A product per sibling group (q/k/v, gate/up) is checked for the same bits and timed.
Prints one JSON line per measurement and the top CUDA kernels of one eager step.

    python benchmarks/engine_step_probe.py --layers 8 --slots 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_32b import build_seed_model, qwen2_config  # noqa: E402

from tracesft.config import EvalSettings, TrainingRecipe  # noqa: E402
from tracesft.generate import engine as engine_module  # noqa: E402
from tracesft.generate.engine import Engine, _Request  # noqa: E402
from tracesft.generate.inference import for_decoding  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--max-len", type=int, default=2568)
    parser.add_argument("--min-context", type=int, default=300)
    parser.add_argument("--max-context", type=int, default=1500)
    args = parser.parse_args()
    say = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731

    config = qwen2_config(False, args.layers)
    model = build_seed_model(config, torch.device("cuda"), torch.bfloat16, TrainingRecipe(), 0)
    model = for_decoding(model, EvalSettings()).eval()
    say(built=args.layers, gib=round(torch.cuda.memory_allocated() / 2**30, 1))
    for slots in args.slots:
        engine = Engine(model, slots, args.max_len)
        lengths = torch.randint(args.min_context, args.max_context, (slots,)).tolist()
        runs = [engine.cache.allocate(engine.row_blocks) for _ in range(slots)]
        engine._active = [_Request(i, n - 1, [int(torch.randint(3, config.vocab_size, ()))], 2, i, runs[i], engine.row_blocks)
                          for i, n in enumerate(lengths)]
        engine._set_step_inputs()
        with torch.inference_mode():
            eager = timed(lambda: engine._decode_logits(slots), 5)
            graph = timed(lambda: engine._decode(slots), 20)
            # The same step with the LoRA branches in line (no side stream): that change's share.
            # A fresh graph pool too: capturing into the pool of freed graphs trips an allocator assert.
            side, engine.side_stream = engine.side_stream, None
            engine.graphs.clear()
            engine.graph_pool = None
            in_line = timed(lambda: engine._decode(slots), 20)
            engine.side_stream = side
            engine.graphs.clear()
            engine.graph_pool = None
            query = torch.randn(slots, config.num_attention_heads, 128, device="cuda", dtype=torch.bfloat16)
            flash = timed(lambda: torch.ops.aten._flash_attention_forward(
                query, engine.cache.keys[0], engine.cache.values[0], engine.query_starts, engine.key_starts, 1,
                engine.max_len, 0.0, True, False, scale=engine.scale, seqused_k=engine.step_lengths), 50)
            x = torch.randn(slots, config.hidden_size, device="cuda", dtype=torch.bfloat16)
            layer = model.model.layers[0]
            projections = timed(lambda: [layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x),
                                         layer.self_attn.o_proj(x), layer.mlp(x)], 20)
            bare = timed(lambda: [F.linear(x, m.base.weight) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                  layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
                         + [F.linear(torch.randn(slots, config.intermediate_size, device="cuda", dtype=torch.bfloat16),
                                     layer.mlp.down_proj.base.weight)], 20)
            # The next exact fusion to weigh: one LoRA-A product per sibling group instead of one per
            # projection. Worth it only if cuBLAS reduces in the same order at the wider shape.
            attention = layer.self_attn
            cast = x.float()
            concat = {}
            for group, modules in (("qkv", (attention.q_proj, attention.k_proj, attention.v_proj)),
                                   ("gate_up", (layer.mlp.gate_proj, layer.mlp.up_proj))):
                weights = torch.cat([m.lora_A for m in modules])
                apart = [F.linear(cast, m.lora_A) for m in modules]
                joined = F.linear(cast, weights).split([m.lora_A.shape[0] for m in modules], dim=1)
                concat[group] = {
                    "identical": all(torch.equal(a, b) for a, b in zip(apart, joined)),
                    "apart_ms": round(timed(lambda ms=modules: [F.linear(cast, m.lora_A) for m in ms], 50), 4),
                    "joined_ms": round(timed(lambda w=weights: F.linear(cast, w), 50), 4),
                }
        kv_gb = float(sum(lengths)) * config.num_key_value_heads * 128 * 2 * 2 / 1e9
        say(slots=slots, layers=args.layers, eager_step_ms=round(eager, 2), graph_step_ms=round(graph, 2),
            graph_step_ms_lora_in_line=round(in_line, 2),
            per_layer_graph_ms=round(graph / args.layers, 3), flash_attention_one_layer_ms=round(flash, 3),
            kv_read_gb_per_layer=round(kv_gb, 3),
            lora_layer_modules_ms=round(projections, 3), bare_bf16_products_ms=round(bare, 3),
            lora_a_one_product_per_group=concat)
        if slots == args.slots[0]:
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine._decode_logits(slots)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
        del engine
        torch.cuda.empty_cache()
    say(refill_fraction=engine_module.REFILL_FRACTION)


if __name__ == "__main__":
    main()
