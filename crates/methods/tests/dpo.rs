//! Offline and iterative preference optimisation: every loss against reference values computed by
//! TRL's own loss code (committed fixture from `tools/make_dpo_fixtures.py`; no Python here),
//! gradients against finite differences on a tiny model in f64, the training loops end to end on
//! a tiny model (reference caching, reference-free losses, resume), the judge-score parser, and
//! one round of online DPO and of self-rewarding on the testbed.

mod common;
use common::{scratch, tiny_model};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_lm::config::LlamaConfig;
use rlhf_lm::llama::{random_weights, Llama, Trainable};
use rlhf_methods::dpo;
use rlhf_methods::kto::{self, kto_batch_loss, mismatched_partners, KtoConfig, KtoExample};
use rlhf_rl::fit::FitConfig;
use rlhf_rl::pairs::PairIds;
use rlhf_rl::policy::{fresh_tiny, tiny_config};
use rlhf_rl::pref::{pair_batch_loss, DpoConfig, PairLossParams, RefCache, REF_CACHE};
use rlhf_rl::pref_losses::{self as pl, KtoBatch, PairLossKind};
use rlhf_rl::trainer::OptimConfig;
use serde_json::Value;

const CPU: Device = Device::Cpu;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pref_losses.trl.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn var(v: &Value) -> Var {
    let x = f64s(v);
    let n = x.len();
    Var::from_tensor(&Tensor::from_vec(x, n, &CPU).unwrap()).unwrap()
}

fn t(v: &Value) -> Tensor {
    var(v).as_tensor().detach()
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: got {got}, TRL {want}"
    );
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// Every loss, metric and gradient equals TRL's on the same log-probs.
#[test]
fn losses_match_trl_fixtures() {
    let fx = fixture();
    assert!(fx["trl_version"].as_str().unwrap().len() >= 3);
    let cases = fx["cases"].as_array().unwrap();
    let mut seen = HashMap::new();
    for (n, case) in cases.iter().enumerate() {
        let loss = case["loss"].as_str().unwrap();
        *seen.entry(loss.to_string()).or_insert(0) += 1;
        let p = &case["params"];
        let beta = p["beta"].as_f64().unwrap();
        let what = format!("case {n} ({loss}, {p})");
        // TRL's ORPO casts to float32.
        let tol = if loss == "orpo" { 2e-6 } else { 1e-9 };
        let exp = &case["expected"];
        if loss == "kto" {
            let logps = var(&case["logps"]);
            let labels: Vec<bool> = case["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_bool().unwrap())
                .collect();
            let out = pl::kto(
                &KtoBatch {
                    logps: logps.as_tensor(),
                    ref_logps: &t(&case["ref_logps"]),
                    labels: &labels,
                    kl_logps: &t(&case["kl_logps"]),
                    ref_kl_logps: &t(&case["ref_kl_logps"]),
                },
                beta,
                p["desirable_weight"].as_f64().unwrap(),
                p["undesirable_weight"].as_f64().unwrap(),
            )
            .unwrap();
            let got = out.loss.to_scalar::<f64>().unwrap();
            close(
                got,
                exp["loss"].as_f64().unwrap(),
                tol,
                &format!("{what} loss"),
            );
            let metrics = pl::kto_metrics(&out, logps.as_tensor(), &labels).unwrap();
            check_metrics(&metrics, exp, tol, &what);
            let g = out.loss.backward().unwrap();
            let g = vec_of(g.get(logps.as_tensor()).unwrap());
            for (a, b) in g.iter().zip(f64s(&case["grad"]["logps"])) {
                close(*a, b, 1e-7, &format!("{what} d/d logps"));
            }
            continue;
        }
        let (pc, pr) = (var(&case["chosen_logps"]), var(&case["rejected_logps"]));
        let (lc, lr) = (t(&case["chosen_len"]), t(&case["rejected_len"]));
        let refs = || (t(&case["ref_chosen_logps"]), t(&case["ref_rejected_logps"]));
        let (pct, prt) = (pc.as_tensor(), pr.as_tensor());
        let mut nll_var = None;
        let out = match loss {
            "dpo" => {
                let (rc, rr) = refs();
                pl::dpo(pct, prt, &rc, &rr, beta).unwrap()
            }
            "cdpo" => {
                let (rc, rr) = refs();
                let eps = p["label_smoothing"].as_f64().unwrap();
                pl::cdpo(pct, prt, &rc, &rr, beta, eps).unwrap()
            }
            "ipo" => {
                let (rc, rr) = refs();
                let norm = p["length_normalize"].as_bool().unwrap();
                pl::ipo(pct, prt, &rc, &rr, &lc, &lr, beta, norm).unwrap()
            }
            "simpo" => pl::simpo(pct, prt, &lc, &lr, beta, p["gamma"].as_f64().unwrap()).unwrap(),
            "orpo" => {
                let nll =
                    Var::from_tensor(&Tensor::new(case["nll"].as_f64().unwrap(), &CPU).unwrap())
                        .unwrap();
                let o = pl::orpo(pct, prt, &lc, &lr, nll.as_tensor(), beta).unwrap();
                nll_var = Some(nll);
                o
            }
            other => panic!("unknown loss {other} in the fixture"),
        };
        let got = out.loss.to_scalar::<f64>().unwrap();
        close(
            got,
            exp["loss"].as_f64().unwrap(),
            tol,
            &format!("{what} loss"),
        );
        let (logged_c, logged_r) = match loss {
            "simpo" | "orpo" => ((pct / &lc).unwrap(), (prt / &lr).unwrap()),
            _ => (pct.clone(), prt.clone()),
        };
        let metrics = pl::pair_metrics(&out, &logged_c, &logged_r).unwrap();
        // Cases run through CPOTrainer on log-ratios (cDPO, summed IPO) have no TRL logps to
        // compare with: CPO logged its inputs, the log-ratios.
        let metrics: Vec<_> = if case["source"].as_str().unwrap().contains("log-ratios") {
            metrics
                .into_iter()
                .filter(|(k, _)| !k.starts_with("logps/"))
                .collect()
        } else {
            metrics
        };
        check_metrics(&metrics, exp, tol, &what);
        let g = out.loss.backward().unwrap();
        for (v, key) in [(&pc, "chosen_logps"), (&pr, "rejected_logps")] {
            let got = vec_of(g.get(v.as_tensor()).unwrap());
            let want = f64s(&case["grad"][key]);
            for (a, b) in got.iter().zip(&want) {
                close(*a, *b, 1e-6, &format!("{what} d/d {key}"));
            }
        }
        if let Some(nll) = nll_var {
            let got = g.get(nll.as_tensor()).unwrap().to_scalar::<f64>().unwrap();
            close(got, case["grad"]["nll"].as_f64().unwrap(), 1e-9, &what);
        }
    }
    for loss in ["dpo", "ipo", "cdpo", "simpo", "orpo", "kto"] {
        assert!(
            seen.get(loss).copied().unwrap_or(0) >= 2,
            "fixture lacks {loss}"
        );
    }
}

/// Every metric TRL logged for the case is present and equal (and no name is invented).
fn check_metrics(got: &[(&str, f64)], exp: &Value, tol: f64, what: &str) {
    for (k, v) in exp.as_object().unwrap() {
        if k == "loss" {
            continue;
        }
        let mine = got
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("{what}: metric {k} missing from {got:?}"));
        // TRL averages the accuracy in float32.
        close(
            mine.1,
            v.as_f64().unwrap(),
            tol.max(1e-7),
            &format!("{what} {k}"),
        );
    }
    for (k, _) in got {
        assert!(
            exp.get(*k).is_some(),
            "{what}: metric {k} is not one TRL logs"
        );
    }
}

/// log1mexp is accurate at both ends (where 1 - exp(x) cancels, and far out).
#[test]
fn log1mexp_is_accurate() {
    let xs = [-1e-6f64, -1e-3, -0.5, -0.7, -1.0, -5.0, -40.0];
    let got = vec_of(&pl::log1mexp(&Tensor::new(&xs, &CPU).unwrap()).unwrap());
    for (x, g) in xs.iter().zip(got) {
        let want = if *x < -std::f64::consts::LN_2 {
            (-x.exp()).ln_1p()
        } else {
            (-x.exp_m1()).ln()
        };
        assert!(
            (g - want).abs() <= 1e-12 * (1.0 + want.abs()),
            "{x}: {g} vs {want}"
        );
    }
}

// ---- gradients through a tiny model -------------------------------------------------------------

fn micro_config() -> LlamaConfig {
    let mut c = tiny_config(24);
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.head_dim = 8;
    c
}

fn weights64(c: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    random_weights(c, seed, 0.4, &CPU)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F64).unwrap()))
        .collect()
}

fn micro_pairs() -> Vec<PairIds> {
    vec![
        PairIds {
            prompt: vec![1, 5, 6],
            chosen: vec![7, 8, 2],
            rejected: vec![9, 2],
            margin: 0.0,
        },
        PairIds {
            prompt: vec![1, 10],
            chosen: vec![11, 2],
            rejected: vec![12, 13, 14, 15, 2],
            margin: 0.0,
        },
        PairIds {
            prompt: vec![1, 16, 17, 18],
            chosen: vec![19, 20, 21, 2],
            rejected: vec![22, 23, 2],
            margin: 0.0,
        },
    ]
}

/// Central finite differences of `loss_of(weights)` against autodiff for a few coordinates of
/// several parameters.
fn check_fd(
    c: &LlamaConfig,
    w64: &HashMap<String, Tensor>,
    loss_of: &dyn Fn(&Llama) -> Tensor,
    what: &str,
) {
    let trainable = Trainable::new(w64).unwrap();
    let model = Llama::from_weights(c, &trainable.tensors(), &CPU).unwrap();
    let loss = loss_of(&model);
    let grads = loss.backward().unwrap();
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ];
    let eps = 1e-5;
    let mut nonzero = 0;
    for name in names {
        let var = &trainable.vars.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = w64[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [5 % base.len(), base.len() / 2, base.len() - 3] {
            let shifted = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let mut w = w64.clone();
                w.insert(
                    name.to_string(),
                    Tensor::from_vec(v, w64[name].dims(), &CPU).unwrap(),
                );
                let m = Llama::from_weights(c, &w, &CPU).unwrap();
                loss_of(&m).to_scalar::<f64>().unwrap()
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[idx]).abs();
            assert!(
                err <= 1e-7 + 1e-5 * numeric.abs(),
                "{what}: {name}[{idx}] autodiff {} vs finite difference {numeric}",
                analytic[idx]
            );
            if analytic[idx].abs() > 1e-9 {
                nonzero += 1;
            }
        }
    }
    assert!(nonzero >= 6, "{what}: gradients are mostly zero");
}

#[test]
fn gradients_match_finite_differences() {
    let c = micro_config();
    let w64 = weights64(&c, 7);
    let reference = Llama::from_weights(&c, &weights64(&c, 8), &CPU).unwrap();
    let pairs = micro_pairs();
    // Reference log-probs from a different model, so the log-ratios are far from 0.
    let refs: Vec<[f64; 2]> = pairs
        .iter()
        .map(|p| {
            let f = |y: &Vec<u32>| {
                let batch =
                    rlhf_lm::score::CompletionBatch::new(&[(p.prompt.clone(), y.clone())], 0, &CPU)
                        .unwrap();
                rlhf_lm::score::completion_logprobs(&reference, &batch, 1.0)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            [f(&p.chosen), f(&p.rejected)]
        })
        .collect();
    for kind in [
        PairLossKind::Dpo,
        PairLossKind::Ipo,
        PairLossKind::Cdpo,
        PairLossKind::Simpo,
        PairLossKind::Orpo,
    ] {
        let params = PairLossParams {
            kind,
            beta: if kind == PairLossKind::Simpo {
                2.0
            } else {
                0.5
            },
            label_smoothing: 0.2,
            ipo_length_normalize: kind == PairLossKind::Ipo,
            simpo_gamma: 0.3,
        };
        let loss_of = |m: &Llama| {
            pair_batch_loss(m, 0, &pairs, Some(&refs), &params, &CPU)
                .unwrap()
                .0
                .loss
        };
        check_fd(&c, &w64, &loss_of, kind.name());
    }
    // KTO: the mismatched rows go through a frozen copy (no gradient), as in training.
    let examples: Vec<KtoExample> = pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let other = &pairs[(i + 1) % pairs.len()];
            [
                KtoExample {
                    prompt: p.prompt.clone(),
                    completion: p.chosen.clone(),
                    label: true,
                    kl_completion: other.rejected.clone(),
                },
                KtoExample {
                    prompt: p.prompt.clone(),
                    completion: p.rejected.clone(),
                    label: false,
                    kl_completion: other.chosen.clone(),
                },
            ]
        })
        .collect();
    let krefs: Vec<[f64; 2]> = (0..examples.len())
        .map(|i| [-6.0 - i as f64 * 0.7, -9.0 + (i % 3) as f64])
        .collect();
    let cfg = KtoConfig {
        beta: 0.7,
        desirable_weight: 1.2,
        ..KtoConfig::default()
    };
    let loss_of = |m: &Llama| {
        let frozen = m.detached();
        kto_batch_loss(m, &frozen, 0, &examples, &krefs, &cfg, &CPU)
            .unwrap()
            .0
            .loss
    };
    check_fd(&c, &w64, &loss_of, "kto");
}

#[test]
fn kto_mismatched_partners_differ_in_prompt() {
    let prompts = ["a", "a", "b", "b", "c", "a"];
    let p = mismatched_partners(&prompts);
    for (i, &j) in p.iter().enumerate() {
        assert_ne!(prompts[i], prompts[j], "{i} -> {j}");
    }
    assert_eq!(p, vec![4, 4, 1, 1, 3, 4]);
    assert_eq!(mismatched_partners(&["x", "x"]), vec![0, 1]);
}

#[test]
fn loss_names_parse() {
    for (s, k) in [
        ("dpo", PairLossKind::Dpo),
        ("IPO", PairLossKind::Ipo),
        ("cdpo", PairLossKind::Cdpo),
        ("simpo", PairLossKind::Simpo),
        ("orpo", PairLossKind::Orpo),
    ] {
        assert_eq!(s.parse::<PairLossKind>().unwrap(), k);
    }
    assert!("kto"
        .parse::<PairLossKind>()
        .unwrap_err()
        .contains("dpo, ipo"));
    assert!(PairLossKind::Dpo.needs_reference() && !PairLossKind::Simpo.needs_reference());
}

// ---- training loops end to end on the testbed's tiny model -------------------------------------

/// A tiny fresh model on disk and a small pair file.
fn tiny_setup(dir: &Path) -> (PathBuf, PathBuf) {
    let task = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 3, &CPU).unwrap();
    let model = dir.join("init");
    lm.save(&model).unwrap();
    let pairs = dir.join("pairs.jsonl");
    let mut lines = String::new();
    for (i, p) in task.train_prompts().iter().take(12).enumerate() {
        let (good, bad) = if i % 2 == 0 {
            (" really great .", " dull .")
        } else {
            (" charming and fun .", " boring , but the plot was weak .")
        };
        lines.push_str(
            &serde_json::json!({"prompt": p, "chosen": good, "rejected": bad}).to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&pairs, lines).unwrap();
    (model, pairs)
}

fn metrics(run: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap()
                .as_object()
                .unwrap()
                .clone()
        })
        .collect()
}

fn quick_dpo(model: &Path, pairs: &Path, out: &Path, loss: PairLossKind) -> DpoConfig {
    DpoConfig {
        model: model.to_path_buf(),
        train_file: pairs.to_path_buf(),
        loss,
        fit: FitConfig {
            eval_file: Some(pairs.to_path_buf()),
            output_dir: out.to_path_buf(),
            epochs: 2,
            batch_size: 4,
            max_len: 32,
            log_every: 1,
            save_every: 3,
            optim: OptimConfig {
                lr: 3e-3,
                warmup_ratio: 0.0,
                ..OptimConfig::default()
            },
            ..DpoConfig::default().fit
        },
        ..DpoConfig::default()
    }
}

/// DPO trains, logs TRL's metrics, caches the reference log-probs; at step 1 the policy equals the
/// reference, so the implicit rewards are 0; training raises the reward accuracy on its pairs.
#[test]
fn dpo_trains_and_logs_trl_metrics() {
    let dir = scratch("dpo");
    let (model, pairs) = tiny_setup(&dir);
    let out = dir.join("run");
    let s = dpo::run(
        &quick_dpo(&model, &pairs, &out, PairLossKind::Dpo),
        false,
        &CPU,
    )
    .unwrap();
    assert_eq!(s.steps, 6);
    let m = metrics(&out);
    let first = &m[0];
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
    ] {
        assert!(first.contains_key(k), "metric {k} missing: {first:?}");
    }
    let r0 = first["rewards/margins"].as_f64().unwrap();
    assert!(r0.abs() < 1e-4, "policy = reference at step 1, margin {r0}");
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4);
    let cache: RefCache =
        serde_json::from_str(&std::fs::read_to_string(out.join(REF_CACHE)).unwrap()).unwrap();
    assert_eq!(cache.train.len(), 12);
    let last = m
        .iter()
        .rev()
        .find(|x| x.contains_key("eval_rewards/accuracies"))
        .unwrap();
    assert!(
        last["eval_rewards/accuracies"].as_f64().unwrap() > 0.6,
        "{last:?}"
    );
    assert!(out.join("model/model.safetensors").exists());
}

/// SimPO and ORPO never load a reference (a missing `ref_model` path is not touched) and write no
/// reference cache; ORPO logs its NLL and odds terms.
#[test]
fn reference_free_losses_skip_the_reference() {
    let dir = scratch("reffree");
    let (model, pairs) = tiny_setup(&dir);
    for kind in [PairLossKind::Simpo, PairLossKind::Orpo] {
        let out = dir.join(kind.name());
        let cfg = DpoConfig {
            ref_model: Some(dir.join("does-not-exist")),
            fit: FitConfig {
                epochs: 1,
                ..quick_dpo(&model, &pairs, &out, kind).fit
            },
            ..quick_dpo(&model, &pairs, &out, kind)
        };
        dpo::run(&cfg, false, &CPU).unwrap();
        assert!(!out.join(REF_CACHE).exists());
        let m = metrics(&out);
        assert!(m[0].contains_key("rewards/margins"));
        if kind == PairLossKind::Orpo {
            assert!(m[0].contains_key("nll_loss") && m[0].contains_key("log_odds_ratio"));
        }
    }
    // DPO with the same missing reference fails, naming it.
    let err = dpo::run(
        &DpoConfig {
            ref_model: Some(dir.join("does-not-exist")),
            ..quick_dpo(&model, &pairs, &dir.join("dpo"), PairLossKind::Dpo)
        },
        false,
        &CPU,
    )
    .err()
    .unwrap();
    assert!(format!("{err}").contains("does-not-exist"), "{err}");
}

/// A run killed after a checkpoint and resumed ends with the same weights as an uninterrupted one,
/// reusing the cached reference log-probs (the reference must be the initial model, not the
/// checkpoint).
#[test]
fn dpo_resume_matches_uninterrupted() {
    let dir = scratch("resume");
    let (model, pairs) = tiny_setup(&dir);
    let full = dir.join("full");
    dpo::run(
        &quick_dpo(&model, &pairs, &full, PairLossKind::Ipo),
        false,
        &CPU,
    )
    .unwrap();
    let part = dir.join("part");
    let cfg = quick_dpo(&model, &pairs, &part, PairLossKind::Ipo);
    // A run that lost everything after its step-3 checkpoint: resuming redoes steps 4-6.
    dpo::run(&cfg, false, &CPU).unwrap();
    std::fs::remove_dir_all(part.join("model")).unwrap();
    let before = RefCache::load(&part.join(REF_CACHE)).unwrap();
    dpo::run(&cfg, true, &CPU).unwrap();
    let after = RefCache::load(&part.join(REF_CACHE)).unwrap();
    for (a, b) in before.train.iter().zip(&after.train) {
        assert!((a[0] - b[0]).abs() < 1e-12 && (a[1] - b[1]).abs() < 1e-12);
    }
    let a = rlhf_train::load_safetensors(&full.join("model/model.safetensors"), &CPU).unwrap();
    let b = rlhf_train::load_safetensors(&part.join("model/model.safetensors"), &CPU).unwrap();
    for (k, x) in &a {
        let d = (x - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{k} differs by {d}");
    }
}

/// KTO on pairs split into desirable/undesirable examples: trains, logs `kl` and TRL's metrics.
#[test]
fn kto_trains_on_unpaired_pairs() {
    let dir = scratch("kto");
    let (model, pairs) = tiny_setup(&dir);
    let out = dir.join("kto");
    let cfg = KtoConfig {
        model,
        pairs_file: Some(pairs),
        fit: FitConfig {
            output_dir: out.clone(),
            epochs: 2,
            batch_size: 6,
            max_len: 32,
            log_every: 1,
            optim: OptimConfig {
                lr: 3e-3,
                warmup_ratio: 0.0,
                ..OptimConfig::default()
            },
            ..KtoConfig::default().fit
        },
        ..KtoConfig::default()
    };
    let s = kto::run(&cfg, false, &CPU).unwrap();
    assert_eq!((s.examples, s.desirable, s.steps), (24, 12, 8));
    let m = metrics(&out);
    for k in [
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
    ] {
        assert!(m.iter().any(|x| x.contains_key(k)), "metric {k} missing");
    }
    // At step 1 the policy is the reference: every log-ratio is 0, so the loss is 1 - sigmoid(0).
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 0.5).abs() < 1e-4,
        "{:?}",
        m[0]
    );
    assert!(out.join(REF_CACHE).exists());
}

// ---- self-rewarding: the judge's score parser, EFT scores -------------------------------------

#[test]
fn judge_scores_parse_robustly() {
    use rlhf_rl::judge::parse_score;
    let ok = [
        ("The response is relevant.\nScore: 4", 4.0),
        ("score :3", 3.0),
        ("**Score:** 5", 5.0),
        ("Score - 2.5", 2.5),
        ("Total score = 4/5.", 4.0),
        ("I would give it a score of 3 out of 5", 3.0),
        ("The score is 0.", 0.0),
        ("Score: 1. Later revised. Score: 2", 2.0),
        ("SCORE:4\n", 4.0),
    ];
    for (text, want) in ok {
        assert_eq!(parse_score(text), Some(want), "{text:?}");
    }
    let bad = [
        "",
        "Great answer!",
        "Score: <total points>",
        "Score: 7",
        "score: 8/10",
        "a score of 3/10",
        "with a score of 100%",
        "Score: 4. Actually the final score: 9",
        "scores: 4",
        "the score",
    ];
    for text in bad {
        assert_eq!(parse_score(text), None, "{text:?}");
    }
}

#[test]
fn eft_scores_are_sextiles_with_ties_shared() {
    use rlhf_rl::judge::sextile_scores;
    let gold: Vec<f64> = (0..12).map(|i| i as f64).collect();
    assert_eq!(
        sextile_scores(&gold),
        vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    );
    assert_eq!(sextile_scores(&[1.0, 1.0, 1.0]), vec![0, 0, 0]);
    assert_eq!(sextile_scores(&[2.0, -1.0, 2.0, 0.5]), vec![3, 0, 3, 1]);
}

#[test]
fn judge_prompt_renders_with_prefill() {
    use rlhf_rl::judge::{JudgeConfig, JudgePrompt, RUBRIC_TEMPLATE};
    let testbed = JudgePrompt::resolve(&JudgeConfig::default(), true, None).unwrap();
    assert_eq!(
        testbed
            .render("review : the plot was", " dull .", None)
            .unwrap(),
        "review : the plot was dull . . score :"
    );
    let rubric = JudgePrompt::resolve(&JudgeConfig::default(), false, None).unwrap();
    assert_eq!(rubric.template, RUBRIC_TEMPLATE);
    assert!(!rubric.chat && rubric.prefill.is_empty());
    let r = rubric.render("Q?", "A.", None).unwrap();
    assert!(r.contains("Question: Q?\nResponse: A.") && r.contains("Score: <total points>"));
    let bad = JudgeConfig {
        template: Some("no placeholder".into()),
        ..JudgeConfig::default()
    };
    assert!(JudgePrompt::resolve(&bad, false, None).is_err());
}

// ---- online DPO and self-rewarding, one round each on the testbed ------------------------------

fn round_dpo() -> DpoConfig {
    DpoConfig {
        fit: FitConfig {
            output_dir: PathBuf::new(),
            batch_size: 8,
            max_len: 48,
            log_every: 1,
            save_every: 0,
            optim: OptimConfig {
                lr: 1e-3,
                warmup_ratio: 0.0,
                ..OptimConfig::default()
            },
            ..DpoConfig::default().fit
        },
        ..DpoConfig::default()
    }
}

/// Two rounds with the simulated annotators: round 2 starts from (and is referenced to) round 1's
/// model; rounds.jsonl, pairs and the final eval.json are written; `--resume` skips done rounds.
#[test]
fn online_dpo_rounds_with_annotators() {
    use rlhf_methods::online_dpo::{self, LabelerKind, OnlineDpoConfig};
    let dir = scratch("online");
    let model = tiny_model(&dir, 5);
    let out = dir.join("run");
    let cfg = OnlineDpoConfig {
        model: model.clone(),
        task: Some("sentiment".into()),
        output_dir: out.clone(),
        rounds: 2,
        prompts_per_round: 12,
        max_new_tokens: Some(6),
        labeler: LabelerKind::Annotators,
        dpo: round_dpo(),
        eval: rlhf_rl::pref::PolicyEval {
            task: Some("sentiment".into()),
            max_prompts: 8,
            ..Default::default()
        },
        ..OnlineDpoConfig::default()
    };
    let s = online_dpo::run(&cfg, false, &CPU).unwrap();
    assert_eq!(s.rounds.len(), 2);
    assert_eq!(s.rounds[1].policy, out.join("round-1/model"));
    assert_eq!(s.model, out.join("round-2/model"));
    for r in &s.rounds {
        assert!(r.pairs > 0 && r.pairs + r.ties_dropped == 12, "{r:?}");
        assert!(r.pairs_gold_agreement.is_some());
        let d = r.dpo.as_ref().unwrap();
        assert_eq!(d.pairs, r.pairs);
    }
    let cache: RefCache = serde_json::from_str(
        &std::fs::read_to_string(out.join("round-2").join(REF_CACHE)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cache.reference,
        out.join("round-1/model").display().to_string()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("rounds.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    assert!(out.join("eval.json").exists() && out.join("round-1/pairs.jsonl").exists());
    // Resuming a finished run redoes nothing.
    let again = online_dpo::run(&cfg, true, &CPU).unwrap();
    assert_eq!(again.model, s.model);
}

/// Self-rewarding on the testbed: EFT teaches the tiny model the judge format, then the policy
/// judges its own 4 candidates per prompt (3 judgements each), best vs worst -> DPO.
#[test]
fn self_rewarding_round_on_the_testbed() {
    use rlhf_methods::online_dpo::{self as self_reward, SelfRewardConfig};
    use rlhf_rl::judge::EftConfig;
    let dir = scratch("selfreward");
    let model = tiny_model(&dir, 5);
    let mut cfg = SelfRewardConfig::default();
    let c = &mut cfg.0;
    c.model = model;
    c.task = Some("sentiment".into());
    c.output_dir = dir.join("run");
    c.rounds = 1;
    c.prompts_per_round = 8;
    c.max_new_tokens = Some(6);
    c.dpo = round_dpo();
    c.eft = EftConfig {
        examples: 96,
        epochs: 4,
        lr: 3e-3,
        batch_size: 16,
        with_demonstrations: false,
        candidates: 6,
    };
    let s = self_reward::run_self_reward(&cfg, false, &CPU).unwrap();
    let r = &s.rounds[0];
    assert_eq!(r.candidates, 32);
    assert_eq!(r.judgements, Some(96));
    let rate = r.parse_rate.unwrap();
    assert!(
        rate > 0.5,
        "after EFT the judge should answer `score : n`: {rate}"
    );
    assert!(dir.join("run/round-1/judgements.jsonl").exists());
    assert_eq!(r.policy, dir.join("run/eft/model"));
    // The policy is its own judge: a separate judge model is refused.
    let mut other = cfg.clone();
    other.0.judge.model = Some(dir.join("init"));
    assert!(self_reward::run_self_reward(&other, false, &CPU).is_err());
}

/// Online DPO's trip-wire judges each round's candidates against the initial policy: round 1's
/// (sampled by the initial policy) pass, round 2's (sampled by round 1's model) are past a tight
/// KL bound, so round 2 does not train and the policy goes back to the initial one; round 3
/// samples from it again (passes) and trains. With `action = "stop"` the rounds end at round 2
/// and the final model is the initial one. A resumed run reads the tripped round back.
#[test]
fn online_dpo_rounds_roll_back_at_the_tripwire() {
    use rlhf_methods::online_dpo::{self, LabelerKind, OnlineDpoConfig};
    use rlhf_rl::tripwire::{TripAction, TripwireConfig};
    let dir = scratch("online-trip");
    let model = tiny_model(&dir, 5);
    let cfg = |out: &str, action: TripAction| OnlineDpoConfig {
        model: model.clone(),
        task: Some("sentiment".into()),
        output_dir: dir.join(out),
        rounds: 3,
        prompts_per_round: 12,
        max_new_tokens: Some(6),
        labeler: LabelerKind::Annotators,
        dpo: round_dpo(),
        tripwire: TripwireConfig {
            max_kl: Some(1e-3),
            action,
            max_rollbacks: 1,
            ..Default::default()
        },
        ..OnlineDpoConfig::default()
    };
    let c = cfg("rollback", TripAction::Rollback);
    let s = online_dpo::run(&c, false, &CPU).unwrap();
    assert_eq!(s.rounds.len(), 3);
    let kl = |i: usize| s.rounds[i].monitors.unwrap().kl;
    assert!(
        kl(0).abs() < 1e-3,
        "the initial policy against itself: {}",
        kl(0)
    );
    assert!(kl(1) > 1e-3, "round 1's model has moved: {}", kl(1));
    assert!(s.rounds[0].tripped.is_none() && s.rounds[0].dpo.is_some());
    let (why, back_to) = s.rounds[1].tripped.clone().unwrap();
    assert!(why.contains("max_kl"), "{why}");
    assert_eq!(back_to, model);
    assert!(s.rounds[1].dpo.is_none());
    assert_eq!(
        s.rounds[2].policy, model,
        "round 3 samples from the restored policy"
    );
    assert!(s.rounds[2].tripped.is_none() && kl(2).abs() < 1e-3);
    assert_eq!(s.model, dir.join("rollback/round-3/model"));
    let again = online_dpo::run(&c, true, &CPU).unwrap();
    assert_eq!(again.model, s.model);
    assert_eq!(again.rounds.len(), 3);

    let s = online_dpo::run(&cfg("stop", TripAction::Stop), false, &CPU).unwrap();
    assert_eq!(s.rounds.len(), 2);
    assert_eq!(
        s.model, model,
        "the rounds end with the last good (initial) policy"
    );
    let trip: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stop/tripwire.json")).unwrap())
            .unwrap();
    assert_eq!(trip["action"], "stopped");
    std::fs::remove_dir_all(dir).ok();
}
