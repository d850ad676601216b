#!/usr/bin/env python3
"""Generate the committed reference values for the offline preference losses.

Writes ``crates/methods/tests/fixtures/pref_losses.trl.json``: batches of sequence log-probs (the
numbers a model would produce) and, for each, the loss, the logged metrics and the gradient of the
loss with respect to the policy log-probs, all computed by TRL's own loss code, run here, not
re-implemented:

* ``dpo``   -- ``trl.DPOTrainer._compute_loss`` with ``loss_type=["sigmoid"]`` (and
  ``precompute_ref_log_probs``, so the reference log-probs are inputs);
* ``ipo``   -- the same with ``loss_type=["ipo"]`` (TRL length-normalises the IPO log-ratios);
* ``ipo_sum`` -- IPO on summed log-ratios (the paper's h): ``trl.experimental.cpo.CPOTrainer
  .cpo_loss`` with ``loss_type="ipo"``, fed the summed log-ratios as its log-probs;
* ``cdpo``  -- conservative DPO (label smoothing eps). TRL 1.x no longer smooths DPOTrainer's
  sigmoid loss; the formula ``(1-eps)*L(w,l) + eps*L(l,w)`` lives on in
  ``CPOTrainer.cpo_loss(loss_type="sigmoid", label_smoothing=eps)``, fed the log-ratios;
* ``simpo`` -- ``CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"``, ``cpo_alpha=0``
  (pure SimPO), on length-averaged log-probs;
* ``orpo``  -- ``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`` (NLL of the chosen
  responses given as an input number, as the trainer's forward would produce it);
* ``kto``   -- ``trl.KTOTrainer._compute_loss`` with ``precompute_ref_log_probs`` (reference and
  mismatched-pair "KL" log-probs as inputs).

The model forward is replaced by a stub that returns fixed per-token log-probs, so TRL's code runs
unchanged from the log-probs on. Run from the repository root (needs torch and trl; CI does not run
it, the Rust tests read the committed JSON)::

    pip install trl
    python3 tools/make_dpo_fixtures.py
"""

import json
import types
from collections import defaultdict
from pathlib import Path

import torch

import trl
from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "crates" / "methods" / "tests" / "fixtures" / "pref_losses.trl.json"
DTYPE = torch.float64


class Accel:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def metrics_self(**kw):
    s = types.SimpleNamespace(
        accelerator=Accel(),
        model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def per_token_rows(gen, lengths, width):
    """Random per-token log-probs (b, width), zero outside each row's completion; the completion
    occupies the last `len` target positions before padding (as a right-padded batch would)."""
    rows, mask = [], []
    for n in lengths:
        lp = torch.zeros(width, dtype=DTYPE)
        m = torch.zeros(width + 1, dtype=torch.long)
        start = 2  # two prompt targets
        lp[start : start + n] = -torch.rand(n, generator=gen, dtype=DTYPE) * 3.0
        m[start + 1 : start + 1 + n] = 1  # completion_mask is over input positions (shifted by one)
        rows.append(lp)
        mask.append(m)
    return torch.stack(rows), torch.stack(mask)


class StubOutputs:
    def __init__(self, log_probs):
        self.log_probs = log_probs
        shape = log_probs.shape
        self.entropy = torch.zeros(shape, dtype=DTYPE)
        self.mean_logits = torch.zeros(shape, dtype=DTYPE)
        self.is_top1 = torch.zeros(shape, dtype=torch.bool)


def dpo_case(gen, loss_type, beta, b, ref_shift=0.0):
    lens_c = torch.randint(1, 9, (b,), generator=gen).tolist()
    lens_r = torch.randint(1, 9, (b,), generator=gen).tolist()
    width = 2 + max(lens_c + lens_r) + 1
    lp, mask = per_token_rows(gen, lens_c + lens_r, width)
    lp.requires_grad_(True)
    sums = lp.detach().sum(1)
    ref = sums + (torch.randn(2 * b, generator=gen, dtype=DTYPE) * 2.0 + ref_shift)
    inputs = {
        "input_ids": torch.ones(2 * b, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width + 1, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:b].clone(),
        "ref_rejected_logps": ref[b:].clone(),
    }
    s = metrics_self(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    model = lambda **kw: StubOutputs(lp)  # noqa: E731
    loss = DPOTrainer._compute_loss(s, model, inputs, False)
    loss.backward()
    # d loss / d row sum = d loss / d any completion token of the row (the loss reads only sums,
    # and IPO's length from the mask).
    g = [lp.grad[i, 2].item() for i in range(2 * b)]
    m = s._metrics["train"]
    return {
        "chosen_logps": sums[:b].tolist(),
        "rejected_logps": sums[b:].tolist(),
        "chosen_len": lens_c,
        "rejected_len": lens_r,
        "ref_chosen_logps": ref[:b].tolist(),
        "ref_rejected_logps": ref[b:].tolist(),
        "expected": {
            "loss": loss.item(),
            **{
                k: m[k][-1]
                for k in [
                    "rewards/chosen",
                    "rewards/rejected",
                    "rewards/accuracies",
                    "rewards/margins",
                    "logps/chosen",
                    "logps/rejected",
                ]
            },
        },
        "grad": {"chosen_logps": g[:b], "rejected_logps": g[b:]},
    }


def cpo_metrics_case(gen, loss_type, beta, b, label_smoothing=0.0, simpo_gamma=0.5, on_logratios=False):
    """CPOTrainer's loss on sequence log-probs. With `on_logratios` the inputs fed as "log-probs"
    are the policy-minus-reference summed log-ratios (for cDPO and summed IPO); otherwise
    (SimPO) they are length-averaged policy log-probs."""
    lens_c = torch.randint(1, 9, (b,), generator=gen).tolist()
    lens_r = torch.randint(1, 9, (b,), generator=gen).tolist()
    sums_c = -torch.rand(b, generator=gen, dtype=DTYPE) * 3.0 * torch.tensor(lens_c, dtype=DTYPE)
    sums_r = -torch.rand(b, generator=gen, dtype=DTYPE) * 3.0 * torch.tensor(lens_r, dtype=DTYPE)
    ref_c = sums_c + torch.randn(b, generator=gen, dtype=DTYPE) * 2.0
    ref_r = sums_r + torch.randn(b, generator=gen, dtype=DTYPE) * 2.0
    sc = sums_c.clone().requires_grad_(True)
    sr = sums_r.clone().requires_grad_(True)
    if on_logratios:
        xc, xr = sc - ref_c, sr - ref_r
    else:
        xc = sc / torch.tensor(lens_c, dtype=DTYPE)
        xr = sr / torch.tensor(lens_r, dtype=DTYPE)
    s = metrics_self(
        beta=beta,
        alpha=0.0,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        cpo_alpha=0.0,
    )
    s.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, s)
    zeros = torch.zeros(b, 1, 1, dtype=DTYPE)
    s.concatenated_forward = lambda model, batch: (xc, xr, zeros, zeros, torch.tensor(0.0, dtype=DTYPE))
    loss, metrics = CPOTrainer.get_batch_loss_metrics(s, None, {}, "train")
    loss.backward()
    expected = {"loss": loss.item()}
    for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]:
        expected[k] = metrics[k]
    if not on_logratios:
        expected["logps/chosen"] = metrics["logps/chosen"]
        expected["logps/rejected"] = metrics["logps/rejected"]
    return {
        "chosen_logps": sums_c.tolist(),
        "rejected_logps": sums_r.tolist(),
        "chosen_len": lens_c,
        "rejected_len": lens_r,
        "ref_chosen_logps": ref_c.tolist(),
        "ref_rejected_logps": ref_r.tolist(),
        "expected": expected,
        "grad": {"chosen_logps": sc.grad.tolist(), "rejected_logps": sr.grad.tolist()},
    }


def orpo_case(gen, beta, b, near_zero=False):
    lens_c = torch.randint(1, 9, (b,), generator=gen).tolist()
    lens_r = torch.randint(1, 9, (b,), generator=gen).tolist()
    scale = 0.05 if near_zero else 3.0
    sums_c = -torch.rand(b, generator=gen, dtype=DTYPE) * scale * torch.tensor(lens_c, dtype=DTYPE)
    sums_r = -torch.rand(b, generator=gen, dtype=DTYPE) * scale * torch.tensor(lens_r, dtype=DTYPE)
    nll_value = float(torch.rand(1, generator=gen) * 2.0 + 0.5)
    sc = sums_c.clone().requires_grad_(True)
    sr = sums_r.clone().requires_grad_(True)
    nll = torch.tensor(nll_value, dtype=DTYPE, requires_grad=True)
    xc = sc / torch.tensor(lens_c, dtype=DTYPE)
    xr = sr / torch.tensor(lens_r, dtype=DTYPE)
    s = metrics_self(beta=beta)
    s.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, s)
    zeros = torch.zeros(b, 1, 1, dtype=DTYPE)
    s.concatenated_forward = lambda model, batch: (xc, xr, zeros, zeros, nll)
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(s, None, {}, "train")
    loss.backward()
    expected = {"loss": loss.item()}
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    ]:
        expected[k] = metrics[k]
    return {
        "chosen_logps": sums_c.tolist(),
        "rejected_logps": sums_r.tolist(),
        "chosen_len": lens_c,
        "rejected_len": lens_r,
        "nll": nll_value,
        "expected": expected,
        "grad": {"chosen_logps": sc.grad.tolist(), "rejected_logps": sr.grad.tolist(), "nll": nll.grad.item()},
    }


def kto_case(gen, beta, b, desirable_weight=1.0, undesirable_weight=1.0, labels=None, kl_shift=0.0):
    lens = torch.randint(1, 9, (b,), generator=gen).tolist()
    if labels is None:
        labels = (torch.rand(b, generator=gen) < 0.5).tolist()
        labels[0], labels[1] = True, False
    width = 2 + max(lens) + 1
    lp, mask = per_token_rows(gen, lens, width)
    lp.requires_grad_(True)
    kl_lens = lens[-1:] + lens[:-1]
    kl_lp, kl_mask = per_token_rows(gen, kl_lens, width)
    sums = lp.detach().sum(1)
    kl_sums = kl_lp.sum(1)
    ref = sums + torch.randn(b, generator=gen, dtype=DTYPE) * 2.0
    ref_kl = kl_sums + torch.randn(b, generator=gen, dtype=DTYPE) * 0.5 + kl_shift
    inputs = {
        "input_ids": torch.ones(b, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(b, width + 1, dtype=torch.long),
        "completion_mask": mask,
        "KL_input_ids": torch.ones(b, width + 1, dtype=torch.long),
        "KL_attention_mask": torch.ones(b, width + 1, dtype=torch.long),
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(labels),
        "ref_logps": ref.clone(),
        "ref_KL_logps": ref_kl.clone(),
    }

    def model(**kw):
        return StubOutputs(kl_lp if kw["input_ids"] is inputs["KL_input_ids"] else lp)

    s = metrics_self(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    s._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, s)
    loss = KTOTrainer._compute_loss(s, model, inputs, False)
    loss.backward()
    g = [lp.grad[i, 2].item() for i in range(b)]
    m = s._metrics["train"]
    expected = {"loss": loss.item(), "kl": m["kl"][-1]}
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]:
        if m.get(k):
            expected[k] = m[k][-1]
    return {
        "logps": sums.tolist(),
        "ref_logps": ref.tolist(),
        "len": lens,
        "labels": [bool(x) for x in labels],
        "kl_logps": kl_sums.tolist(),
        "ref_kl_logps": ref_kl.tolist(),
        "expected": expected,
        "grad": {"logps": g},
    }


def main():
    gen = torch.Generator().manual_seed(20240501)
    cases = []

    def add(loss, params, source, case):
        cases.append({"loss": loss, "params": params, "source": source, **case})

    for beta, b, shift in [(0.1, 4, 0.0), (0.5, 6, 3.0), (0.05, 3, -8.0)]:
        add("dpo", {"beta": beta}, "DPOTrainer._compute_loss loss_type=sigmoid", dpo_case(gen, "sigmoid", beta, b, shift))
    for beta, b in [(0.1, 4), (0.5, 5), (1.0, 3)]:
        add(
            "ipo",
            {"beta": beta, "length_normalize": True},
            "DPOTrainer._compute_loss loss_type=ipo (length-normalised)",
            dpo_case(gen, "ipo", beta, b),
        )
    for beta, b in [(0.1, 4), (0.5, 3)]:
        add(
            "ipo",
            {"beta": beta, "length_normalize": False},
            "CPOTrainer.cpo_loss loss_type=ipo on summed log-ratios",
            cpo_metrics_case(gen, "ipo", beta, b, on_logratios=True),
        )
    for beta, b, eps in [(0.1, 4, 0.1), (0.3, 5, 0.25), (0.1, 3, 0.0)]:
        add(
            "cdpo",
            {"beta": beta, "label_smoothing": eps},
            "CPOTrainer.cpo_loss loss_type=sigmoid with label_smoothing, on log-ratios",
            cpo_metrics_case(gen, "sigmoid", beta, b, label_smoothing=eps, on_logratios=True),
        )
    for beta, gamma, b in [(2.0, 0.5, 4), (2.5, 1.4, 5), (0.1, 0.05, 3)]:
        add(
            "simpo",
            {"beta": beta, "gamma": gamma},
            "CPOTrainer.get_batch_loss_metrics loss_type=simpo cpo_alpha=0",
            cpo_metrics_case(gen, "simpo", beta, b, simpo_gamma=gamma),
        )
    for beta, b, near in [(0.1, 4, False), (0.25, 5, True), (1.0, 3, False)]:
        add("orpo", {"beta": beta}, "ORPOTrainer.get_batch_loss_metrics", orpo_case(gen, beta, b, near))
    for beta, b, dw, uw, labels, kl_shift in [
        (0.1, 6, 1.0, 1.0, None, 0.0),
        (0.5, 5, 1.33, 1.0, None, -2.0),
        (0.1, 4, 1.0, 1.0, [True, True, True, True], 1.0),
        (0.2, 4, 1.0, 0.75, [False, False, True, False], -5.0),
    ]:
        add(
            "kto",
            {"beta": beta, "desirable_weight": dw, "undesirable_weight": uw},
            "KTOTrainer._compute_loss loss_type=kto",
            kto_case(gen, beta, b, dw, uw, labels, kl_shift),
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "generator": "tools/make_dpo_fixtures.py",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "note": "log-probs are sums over completion tokens; *_len are completion lengths; grads are "
        "d loss / d (summed policy log-prob) by torch autograd through TRL's code",
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases, trl {trl.__version__})")


if __name__ == "__main__":
    main()
