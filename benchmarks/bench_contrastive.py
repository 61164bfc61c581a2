"""Contrastive losses, forward + backward: ours against pytorch-metric-learning (SupConLoss,
NTXentLoss with ref_emb, which equal supcon / info_nce for cosine) and against eager PyTorch
(the reference) for negative_contrastive (seed 004 eq. 6) and negative_learning (eq. 1)."""
from __future__ import annotations

import torch

import xlt_fast
from xlt_fast import reference as R
from xlt_fast.benchmarks.common import fp64_cpu, fwd_bwd, kernel_backends
from xlt_fast.benchmarks.harness import Case


def _pml():
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        return None
    return losses


def _supcon(device, B, d, with_reference=True):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, d, generator=g).to(device)
    y = torch.randint(0, 10, (B,), generator=g).to(device)
    impls = {}
    if with_reference:
        f64, y64 = fp64_cpu(f, y)
        impls["reference"] = fwd_bwd(lambda x: R.supcon(x, y64, 0.1), f64)
    pml = _pml()
    if pml is not None:
        loss = pml.SupConLoss(temperature=0.1)
        impls["pml.SupConLoss"] = fwd_bwd(lambda x: loss(x, y), f)
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, b=name: xlt_fast.supcon(x, y, 0.1, backend=b), f)
    return Case("supcon", f"B={B},d={d}", "fwd+bwd", impls, baseline="pml.SupConLoss",
                reference="reference" if with_reference else None)


def _info_nce(device, B, d, with_reference=True):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    ar = torch.arange(B, device=device)
    impls = {}
    if with_reference:
        impls["reference"] = fwd_bwd(lambda x, z: R.info_nce(x, z, 0.05), *fp64_cpu(a, b))
    pml = _pml()
    if pml is not None:
        loss = pml.NTXentLoss(temperature=0.05)
        impls["pml.NTXentLoss"] = fwd_bwd(lambda x, z: loss(x, ar, ref_emb=z, ref_labels=ar.clone()), a, b)
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, z, bk=name: xlt_fast.info_nce(x, z, 0.05, backend=bk), a, b)
    return Case("info_nce", f"B={B},d={d}", "fwd+bwd", impls, baseline="pml.NTXentLoss",
                reference="reference" if with_reference else None)


def _negative_contrastive(device, B, K, d):
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(B, d, generator=g).to(device), torch.randn(B, d, generator=g).to(device)
    idx = torch.randint(0, B, (B, K), generator=g).to(device)
    impls = {"reference": fwd_bwd(lambda x, z: R.negative_contrastive(x, z, z[idx.cpu()], 5.0), *fp64_cpu(a, p)),
             "eager torch": fwd_bwd(lambda x, z: R.negative_contrastive(x, z, z[idx], 5.0), a, p)}
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, z, bk=name: xlt_fast.negative_contrastive(x, z, idx, 5.0, backend=bk), a, p)
    return Case("negative_contrastive", f"B={B},K={K},d={d}", "fwd+bwd", impls, baseline="eager torch")


def _negative_learning(device, B, C):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(B, C, generator=g) * 3).to(device)
    y = (torch.rand(B, C, generator=g) > 0.5).to(device)
    impls = {"reference": fwd_bwd(lambda x: R.negative_learning(x, y.cpu()), *fp64_cpu(z)),
             "eager torch": fwd_bwd(lambda x: R.negative_learning(x, y), z)}
    for name in kernel_backends(device, "cpu", "triton"):
        impls[name] = fwd_bwd(lambda x, bk=name: xlt_fast.negative_learning(x, y, backend=bk), z)
    return Case("negative_learning", f"B={B},C={C}", "fwd+bwd", impls, baseline="eager torch")


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = [_supcon(device, 512, 768), _info_nce(device, 512, 768)]
    if quick:
        return out + [_negative_contrastive(device, 512, 8, 768), _negative_learning(device, 4096, 10)]
    out += [_supcon(device, 2048, 768), _info_nce(device, 2048, 768),
            _negative_contrastive(device, 512, 8, 768), _negative_contrastive(device, 4096, 16, 768),
            _negative_learning(device, 4096, 10), _negative_learning(device, 65536, 20)]
    if device.type == "cuda":  # O(B d) memory: the dense form (B^2 logits, several copies) does not fit
        out += [_supcon(device, 65536, 768, with_reference=False), _info_nce(device, 65536, 768, with_reference=False)]
    return out
