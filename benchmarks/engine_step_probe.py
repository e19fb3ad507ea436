"""Where a decoding step of the engine spends its time, on the 32B's layer shapes (GPU only).

Builds `--layers` layers of the 32B architecture (NF4 + random LoRA, then `for_decoding`:
dequantised once, LoRA unmerged), fills `--slots` slots with contexts of random length in
[`--min-context`, `--max-context`], and times: the decode step as a CUDA graph (as shipped: the
side stream below `SIDE_STREAM_BELOW_ROWS` rows), again with the side stream's choice flipped, and
eagerly; the attention kernel alone for one layer; the bare bf16 products of one layer's
projections; and one prefill call (`PREFILL_TOKENS` tokens), without and with the side stream.
Prints one JSON line per row count and the top CUDA kernels of one eager step and of the prefill
call.

    python benchmarks/engine_step_probe.py --layers 8 --slots 256 128 64 32 16 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import milliseconds  # noqa: E402
from random_32b import build_seed_model, qwen2_config  # noqa: E402

from tracesft.config import EvalSettings, TrainingRecipe  # noqa: E402
from tracesft.generate import engine as engine_module  # noqa: E402
from tracesft.generate.engine import Engine, _Request  # noqa: E402
from tracesft.generate.inference import for_decoding  # noqa: E402


PREFILL_PROMPT = 300  # tokens per prompt in the timed prefill call (the split's mean is 302)


def release_graphs(engine: Engine) -> None:
    """Drop the captured graphs and their pool: capturing into the pool of freed graphs trips an
    allocator assert, so the next capture gets a fresh one."""
    engine.graphs.clear()
    engine.graph_pool = None


def recaptured(engine: Engine, rows: int) -> float:
    """The graph step's milliseconds, captured afresh under the engine's settings of now."""
    release_graphs(engine)
    return milliseconds(lambda: engine._decode(rows), 20)


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
            graph = milliseconds(lambda: engine._decode(slots), 20)
            # The same step with the side stream's choice flipped for this row count: its share.
            shipped_side = slots < engine.side_stream_below_rows
            shipped_threshold, engine.side_stream_below_rows = engine.side_stream_below_rows, 0 if shipped_side else slots + 1
            flipped = recaptured(engine, slots)
            engine.side_stream_below_rows = shipped_threshold
            eager = milliseconds(lambda: engine._decode_logits(slots), 5)
            release_graphs(engine)
            query = torch.randn(slots, config.num_attention_heads, 128, device="cuda", dtype=torch.bfloat16)
            flash = milliseconds(lambda: torch.ops.aten._flash_attention_forward(
                query, engine.cache.keys[0], engine.cache.values[0], engine.query_starts, engine.key_starts, 1,
                engine.max_len, 0.0, True, False, scale=engine.scale, seqused_k=engine.step_lengths), 50)
            x = torch.randn(slots, config.hidden_size, device="cuda", dtype=torch.bfloat16)
            layer = model.model.layers[0]
            projections = milliseconds(lambda: [layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x),
                                         layer.self_attn.o_proj(x), layer.mlp(x)], 20)
            bare = milliseconds(lambda: [F.linear(x, m.base.weight) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                  layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
                         + [F.linear(torch.randn(slots, config.intermediate_size, device="cuda", dtype=torch.bfloat16),
                                     layer.mlp.down_proj.base.weight)], 20)
            # A prefill call as the engine makes it: PREFILL_TOKENS tokens of ~300-token prompts.
            prefill = {}
            count = min(slots, engine_module.PREFILL_TOKENS // PREFILL_PROMPT)
            if count:
                prompts = torch.randint(3, config.vocab_size, (count, PREFILL_PROMPT)).tolist()
                starts = runs[:count]
                prefill_ms = milliseconds(lambda: engine._prefill_logits(prompts, starts), 3)
                # Prefill with the LoRA products on the side stream, as the engine ran it before.
                forward = engine._forward
                engine._forward = lambda *args: forward(*args, side=engine.side_stream)
                prefill_side_ms = milliseconds(lambda: engine._prefill_logits(prompts, starts), 3)
                engine._forward = forward
                flop = 2 * count * PREFILL_PROMPT * sum(p.numel() for n, p in layer.named_parameters() if "lora" not in n) * args.layers
                prefill = {"tokens": count * PREFILL_PROMPT, "ms": round(prefill_ms, 2), "ms_side_stream": round(prefill_side_ms, 2),
                           "dense_tflop_per_s": round(flop / prefill_ms / 1e9, 1)}
        kv_gb = float(sum(lengths)) * config.num_key_value_heads * 128 * 2 * 2 / 1e9
        say(slots=slots, layers=args.layers, eager_step_ms=round(eager, 2), graph_step_ms=round(graph, 2),
            side_stream=shipped_side, graph_step_ms_side_stream_flipped=round(flipped, 2),
            per_layer_graph_ms=round(graph / args.layers, 3), flash_attention_one_layer_ms=round(flash, 3),
            kv_read_gb_per_layer=round(kv_gb, 3),
            lora_layer_modules_ms=round(projections, 3), bare_bf16_products_ms=round(bare, 3),
            prefill=prefill)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_logits(slots)
            torch.cuda.synchronize()
        print(f"top kernels of one eager step at {slots} rows", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
        if prefill:
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine._prefill_logits(prompts, starts)
                torch.cuda.synchronize()
            print(f"top kernels of one prefill call of {prefill['tokens']} tokens", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)
        del engine
        torch.cuda.empty_cache()
    say(refill_fraction=engine_module.REFILL_FRACTION)


if __name__ == "__main__":
    main()
