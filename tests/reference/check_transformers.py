#!/usr/bin/env python3
"""Checks Troupe's backbone against transformers' own LongcatFlashForCausalLM (the numeric
reference the spec names), in float64, on the GPU machine (transformers 5.x is installed
there, not here). For each model directory (plain LongcatFlashForCausalLM configs with random
weights from `troupe init-model`) it loads the safetensors into the transformers model (fusing
the per-expert weights into its gate_up_proj/down_proj layout), runs the token ids, and
compares with the logits Troupe wrote (`troupe logits`), plus greedy argmax per position.

    check_transformers.py --case DIR IDS.json TROUPE_LOGITS.npy [--case ...] [--tol 1e-4] [--min-agreement 1.0]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from longcat_reference import load_safetensors  # noqa: E402  (float64 tensors)


def hf_model(model_dir):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM
    c = json.load(open(os.path.join(model_dir, "config.json")))
    assert c["architectures"][0] == "LongcatFlashForCausalLM", "transformers has no n-gram embedding"
    rope = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    if c.get("rope_scaling"):
        rope = dict(c["rope_scaling"], rope_theta=c["rope_theta"])
    keys = ["vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size", "expert_ffn_hidden_size",
            "n_routed_experts", "zero_expert_num", "moe_topk", "routed_scaling_factor", "rms_norm_eps",
            "bos_token_id", "eos_token_id"]
    floats = {"routed_scaling_factor", "rms_norm_eps"}
    cfg = LongcatFlashConfig(**{k: float(c[k]) if k in floats else c[k] for k in keys}, num_hidden_layers=2 * c["num_layers"],
                             head_dim=c["qk_rope_head_dim"], rope_parameters=rope,
                             max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LongcatFlashForCausalLM(cfg).double().eval()
    w = load_safetensors(os.path.join(model_dir, "model.safetensors"))
    state = model.state_dict()
    n_routed, F = c["n_routed_experts"], c["expert_ffn_hidden_size"]
    for l in range(c["num_layers"]):
        p = f"model.layers.{l}.mlp.experts."
        if p + "gate_up_proj" in state:
            gu = state[p + "gate_up_proj"].clone()
            dn = state[p + "down_proj"].clone()
            for e in range(n_routed):
                gu[e] = torch.cat([w.pop(f"{p}{e}.gate_proj.weight"), w.pop(f"{p}{e}.up_proj.weight")])
                dn[e] = w.pop(f"{p}{e}.down_proj.weight")
            w[p + "gate_up_proj"], w[p + "down_proj"] = gu, dn
    missing = [k for k in state if k not in w]
    unused = [k for k in w if k not in state]
    if missing or unused:
        sys.exit(f"key mismatch: missing {missing[:5]}, unused {unused[:5]}")
    model.load_state_dict({k: w[k] for k in state})
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=3, action="append", required=True, metavar=("DIR", "IDS", "LOGITS"))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--min-agreement", type=float, default=1.0, help="share of positions whose argmax must agree")
    ap.add_argument("--bf16-baseline", action="store_true",
                    help="also run transformers in bfloat16 on the GPU; the tolerance becomes the larger of --tol and "
                         "1.5x that run's own error (what bf16 costs any implementation of the model)")
    args = ap.parse_args()
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = True
    with torch.no_grad():
        for model_dir, ids_path, logits_path in args.case:
            model = hf_model(model_dir)
            ids = torch.tensor([json.load(open(ids_path))])
            ref = model(input_ids=ids).logits[0].numpy()
            got = np.load(logits_path).astype(np.float64)
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
            tol = args.tol
            baseline = ""
            if args.bf16_baseline:
                bf16 = model.to(torch.bfloat16).cuda()
                low = bf16(input_ids=ids.cuda()).logits[0].double().cpu().numpy()
                low_err = np.linalg.norm(low - ref) / np.linalg.norm(ref)
                low_agree = float(np.mean(low.argmax(-1) == ref.argmax(-1)))
                tol = max(tol, 1.5 * low_err)
                baseline = f"; transformers bf16: {low_err:.2e}, argmax agreement {low_agree:.3f}"
            good = err < tol and agree >= args.min_agreement
            ok &= good
            print(f"{os.path.basename(model_dir)}: relative L2 {err:.2e} (tol {tol:.1e}), argmax agreement {agree:.3f}"
                  f"{baseline} -> {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
