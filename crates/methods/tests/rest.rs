//! ReST and ReST-EM: the filters, thresholds, normalisation and per-source cap by hand; the Grow
//! data set (samples ∪ the original data, scored once, normalised); ReST-EM's cap and reset to the
//! base model; GOLD's loss against per-token log-probs.

mod common;
use common::{scratch, CPU};

use std::path::Path;

use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_methods::rest::{
    filter, gold_share, improve_lr, measured_range, normalise, quantile, row_thresholds, run,
    Origin, RestConfig, ScoredRow, ThresholdMode,
};
use rlhf_rl::objectives::nll_share;
use rlhf_rl::policy::{fresh_tiny, TrainableLm};
use rlhf_rl::reward_source::SourceKind;

fn row(source: usize, reward: f64) -> ScoredRow {
    ScoredRow {
        prompt: format!("p{source}"),
        completion: format!("c{reward}"),
        reward,
        raw_reward: reward,
        origin: Origin::Policy,
        source,
    }
}

#[test]
fn normalisation_and_quantiles_by_hand() {
    assert_eq!(measured_range(&[3.0, 2.0, 4.0]), [2.0, 4.0]);
    assert_eq!(measured_range(&[5.0, 5.0]), [5.0, 6.0]);
    assert_eq!(normalise(3.0, [2.0, 4.0]), 0.5);
    assert_eq!(normalise(5.0, [2.0, 4.0]), 1.0);
    assert_eq!(normalise(1.0, [2.0, 4.0]), 0.0);
    // numpy.quantile([1, 2, 3, 4], 0.5) = 2.5; 0.9 -> h = 2.7 -> 3 + 0.7 = 3.7
    assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.5) - 2.5).abs() < 1e-12);
    assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.9) - 3.7).abs() < 1e-12);
    assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.0), 1.0);
    assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 1.0), 4.0);
    assert!((improve_lr(1e-3, 0.5, 2) - 2.5e-4).abs() < 1e-18);
    assert_eq!(improve_lr(1e-3, 0.5, 0), 1e-3);
}

#[test]
fn global_threshold_filters_at_each_step_of_the_schedule() {
    let rows: Vec<ScoredRow> = [0.1, 0.75, 0.8, 0.95, 0.7, 0.0]
        .iter()
        .enumerate()
        .map(|(i, &r)| row(i % 2, r))
        .collect();
    let keep = |tau| filter(&rows, tau, ThresholdMode::Global, None, 0);
    assert_eq!(keep(0.0), vec![0, 1, 2, 3, 4, 5], "tau 0 is no filter");
    assert_eq!(keep(0.7), vec![1, 2, 3, 4]);
    assert_eq!(keep(0.8), vec![2, 3]);
    assert_eq!(keep(0.9), vec![3]);
    assert_eq!(keep(0.95), vec![3]);
    assert_eq!(keep(0.99), Vec::<usize>::new());
}

#[test]
fn per_source_thresholds_by_hand() {
    // source 0: 0.1 .. 0.5; source 1: 0.9, 0.6
    let mut rows: Vec<ScoredRow> = [0.1, 0.2, 0.3, 0.4, 0.5]
        .iter()
        .map(|&r| row(0, r))
        .collect();
    rows.push(row(1, 0.9));
    rows.push(row(1, 0.6));
    // percentile 0.5: source 0 -> 0.3; source 1 -> 0.6 + 0.5 * 0.3 = 0.75
    let t = row_thresholds(&rows, 0.5, ThresholdMode::Percentile);
    assert!(
        (t[0] - 0.3).abs() < 1e-12 && (t[6] - 0.75).abs() < 1e-12,
        "{t:?}"
    );
    assert_eq!(
        filter(&rows, 0.5, ThresholdMode::Percentile, None, 0),
        vec![2, 3, 4, 5]
    );
    // percentile 0.9: source 0 -> h = 3.6 -> 0.4 + 0.6 * 0.1 = 0.46; source 1 -> 0.87
    assert_eq!(
        filter(&rows, 0.9, ThresholdMode::Percentile, None, 0),
        vec![4, 5]
    );
    assert_eq!(
        filter(&rows, 0.0, ThresholdMode::Percentile, None, 0).len(),
        7,
        "the 0-quantile is each source's minimum: nothing is dropped"
    );
    // gamma 0.5: source 0 -> 0.5 * 0.5 + 0.5 * 0.3 = 0.4; source 1 -> 0.5 * 0.9 + 0.5 * 0.75 = 0.825
    let t = row_thresholds(&rows, 0.5, ThresholdMode::Gamma);
    assert!(
        (t[0] - 0.4).abs() < 1e-12 && (t[5] - 0.825).abs() < 1e-12,
        "{t:?}"
    );
    assert_eq!(
        filter(&rows, 0.5, ThresholdMode::Gamma, None, 0),
        vec![3, 4, 5]
    );
    // gamma 0 keeps each source's above-mean rows; gamma 1 only its best
    assert_eq!(
        filter(&rows, 0.0, ThresholdMode::Gamma, None, 0),
        vec![2, 3, 4, 5]
    );
    assert_eq!(
        filter(&rows, 1.0, ThresholdMode::Gamma, None, 0),
        vec![4, 5]
    );
}

#[test]
fn per_source_cap_keeps_at_most_cap_of_each_source_seeded() {
    // source 0: 5 rows, source 1: 2 rows, source 2: 1 row; all pass tau 0.5 but rows 7, 8
    let mut rows: Vec<ScoredRow> = (0..5).map(|_| row(0, 1.0)).collect();
    rows.extend([row(1, 1.0), row(1, 1.0), row(2, 0.0), row(2, 1.0)]);
    let kept = filter(&rows, 0.5, ThresholdMode::Global, Some(2), 7);
    let count = |s| kept.iter().filter(|&&i| rows[i].source == s).count();
    assert_eq!((count(0), count(1), count(2)), (2, 2, 1), "{kept:?}");
    assert!(kept.contains(&5) && kept.contains(&6) && kept.contains(&8) && !kept.contains(&7));
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "data-set order");
    assert_eq!(kept, filter(&rows, 0.5, ThresholdMode::Global, Some(2), 7));
    // over seeds, every row of source 0 is sometimes chosen (a random subset, not the first two)
    let mut seen = [false; 5];
    for seed in 0..40 {
        for i in filter(&rows, 0.5, ThresholdMode::Global, Some(2), seed) {
            if i < 5 {
                seen[i] = true;
            }
        }
    }
    assert_eq!(seen, [true; 5]);
}

#[test]
fn gold_loss_matches_the_weighted_log_probs_by_hand() {
    let task = task_by_name("arithmetic", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 4, &CPU).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = task.demonstrations()[..3]
        .iter()
        .map(|(p, c)| lm.encode(p, c, true, 32).unwrap())
        .collect();
    let returns = [0.25, 1.0, 0.5];
    let batch = [0, 1, 2];
    // per-token log-probs from the scoring path, one row at a time
    let model = lm.model(&CPU).unwrap();
    let mut want = [0.0f64; 2]; // u = 0 and u = 0.3
    let n_tokens: usize = rows.iter().map(|r| r.1.len()).sum();
    for (i, r) in rows.iter().enumerate() {
        let b =
            rlhf_lm::score::CompletionBatch::new(std::slice::from_ref(r), lm.pad_id, &CPU).unwrap();
        let lp = rlhf_lm::score::completion_logprobs(&model, &b, 1.0).unwrap();
        let lp = rlhf_lm::score::per_row(&lp, &b).unwrap().remove(0);
        assert_eq!(lp.len(), r.1.len());
        for &l in &lp {
            let (l, p) = (l as f64, (l as f64).exp());
            want[0] -= p * returns[i] * l;
            want[1] -= p.max(0.3) * returns[i] * l;
        }
    }
    for (k, u) in [0.0, 0.3].into_iter().enumerate() {
        let whole = gold_share(&lm, &rows, &returns, &batch, &batch, u, &CPU)
            .unwrap()
            .0;
        let got = whole.to_scalar::<f32>().unwrap() as f64;
        let w = want[k] / n_tokens as f64;
        assert!(
            (got - w).abs() < 1e-5 * (1.0 + w.abs()),
            "u = {u}: {got} vs {w}"
        );
        // micro-batches add up to the batch
        let a = gold_share(&lm, &rows, &returns, &batch, &[0, 1], u, &CPU)
            .unwrap()
            .0;
        let b = gold_share(&lm, &rows, &returns, &batch, &[2], u, &CPU)
            .unwrap()
            .0;
        let sum = (a + b).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((sum - got).abs() < 1e-5 * (1.0 + got.abs()));
    }
    // u = 1 makes every weight 1: GOLD is then the return-weighted NLL; with equal returns R, R x NLL
    let ones = [0.5; 3];
    let g = gold_share(&lm, &rows, &ones, &batch, &batch, 1.0, &CPU)
        .unwrap()
        .0;
    let nll = nll_share(&lm, &rows, &batch, &batch, &CPU).unwrap().0;
    let (g, nll) = (
        g.to_scalar::<f32>().unwrap() as f64,
        nll.to_scalar::<f32>().unwrap() as f64,
    );
    assert!((g - 0.5 * nll).abs() < 1e-5 * nll.abs(), "{g} vs {nll}");
}

/// The arithmetic task's tiny model at `<root>/init-<seed>`, and a data file of its first `n`
/// demonstrations.
fn setup(root: &Path, n: usize) {
    let task = task_by_name("arithmetic", 0).unwrap();
    for seed in [5, 9] {
        fresh_tiny(tokenizer_for(task.as_ref()), seed, &CPU)
            .unwrap()
            .save(&root.join(format!("init-{seed}")))
            .unwrap();
    }
    let lines: Vec<String> = task.demonstrations()[..n]
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string())
        .collect();
    std::fs::write(root.join("d.jsonl"), lines.join("\n")).unwrap();
}

fn small_config(root: &Path, out: &str) -> RestConfig {
    let mut c = RestConfig {
        model: root.join("init-5"),
        task: Some("arithmetic".into()),
        train_file: Some(root.join("d.jsonl")),
        grow_steps: 1,
        samples_per_source: 3,
        grow_chunk: 5,
        thresholds: vec![0.0],
        ..RestConfig::default()
    };
    c.reward.source = SourceKind::Gold;
    c.validation.prompts = 0;
    c.fit.output_dir = root.join(out);
    c.fit.epochs = 1;
    c.fit.batch_size = 8;
    c.fit.max_len = 32;
    c.fit.save_every = 0;
    c.fit.optim.lr = 1e-3;
    c
}

fn dataset(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("dataset.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn grow_is_the_union_of_samples_and_the_original_data_scored_and_normalised() {
    let root = scratch("rest-grow");
    setup(&root, 12);
    let task = task_by_name("arithmetic", 0).unwrap();
    let cfg = small_config(&root, "run");
    let summary = run(&cfg, false, &CPU).unwrap();
    let rows = dataset(&root.join("run/grow-1"));
    let demos = &task.demonstrations()[..12];
    let sources: std::collections::HashSet<&str> = demos.iter().map(|d| d.0.as_str()).collect();
    let policy: Vec<_> = rows.iter().filter(|r| r["origin"] == "policy").collect();
    let data: Vec<_> = rows.iter().filter(|r| r["origin"] == "data").collect();
    assert_eq!(policy.len(), 3 * sources.len());
    assert_eq!(data.len(), 12);
    for (r, (p, c)) in data.iter().zip(demos) {
        assert_eq!(
            (
                r["prompt"].as_str().unwrap(),
                r["completion"].as_str().unwrap()
            ),
            (p.as_str(), c.as_str())
        );
    }
    // every row scored by the (explicitly requested) gold source, then min-max normalised
    let raw: Vec<f64> = rows
        .iter()
        .map(|r| r["raw_reward"].as_f64().unwrap())
        .collect();
    for (r, &x) in rows.iter().zip(&raw) {
        let g = task.gold(
            r["prompt"].as_str().unwrap(),
            r["completion"].as_str().unwrap(),
        );
        assert!((g - x).abs() < 1e-12, "{r}");
    }
    let (lo, hi) = raw
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(hi > lo, "the test needs rewards that differ");
    for (r, &x) in rows.iter().zip(&raw) {
        let want = (x - lo) / (hi - lo);
        assert!((r["reward"].as_f64().unwrap() - want).abs() < 1e-12);
    }
    // tau 0 trains on all of D_g; the stage records what it kept
    let st = &summary.stages[1];
    assert_eq!((st.kept, st.dataset_rows), (rows.len(), rows.len()));
    assert_eq!(st.optimizer_steps, rows.len().div_ceil(8) as u64);
    assert_eq!(summary.samples, policy.len());
    assert_eq!(summary.grows[0].range, [lo, hi]);
    assert!(root
        .join("run/grow-1/improve-0/model/model.safetensors")
        .exists());
}

fn weights(dir: &Path) -> Vec<f32> {
    let lm = TrainableLm::load(dir, &CPU).unwrap();
    let mut names: Vec<_> = lm.params.vars.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    let snap = lm.snapshot().unwrap();
    names
        .iter()
        .flat_map(|n| snap[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn rest_em_keeps_correct_samples_capped_and_restarts_from_the_base_model() {
    let root = scratch("rest-em");
    setup(&root, 16);
    let mut cfg = small_config(&root, "em");
    // ReST-EM: binary reward (here "correct" = gold >= -0.15: at most one word too many, which an
    // untrained model writing 3 words reaches about as often as not), no original data, at most 2
    // per prompt, from the base model.
    cfg.base_model = Some(root.join("init-9"));
    cfg.binarize = Some(-0.15);
    cfg.max_new_tokens = Some(3);
    cfg.keep_original = false;
    cfg.samples_per_source = 6;
    cfg.max_per_source = Some(2);
    cfg.thresholds = vec![0.5];
    cfg.reset_to_base = true;
    cfg.grow_steps = 2;
    cfg.fit.optim.lr = 1e-4;
    let summary = run(&cfg, false, &CPU).unwrap();
    for g in 1..=2 {
        let rows = dataset(&root.join(format!("em/grow-{g}")));
        assert!(rows.iter().all(|r| r["origin"] == "policy"));
        let correct = |s: u64| {
            rows.iter()
                .filter(|r| r["source"] == s && r["raw_reward"] == 1.0)
                .count()
        };
        assert!(rows
            .iter()
            .all(|r| r["raw_reward"] == 1.0 || r["raw_reward"] == 0.0));
        let want: usize = (0..16).map(|s| correct(s).min(2)).sum();
        let st = &summary.stages[g];
        assert_eq!(st.kept, want, "grow {g}");
        assert!(
            st.kept > 0 && st.kept < rows.len(),
            "grow {g}: {} of {}",
            st.kept,
            rows.len()
        );
        // the Improve starts from the base model, not from the policy that sampled (in Grow 1
        // they are far apart; later the sampler is itself a fine-tuned base)
        let base = weights(&root.join("init-9"));
        let sampler = weights(&summary.grows[g - 1].policy);
        let trained = weights(&st.model);
        assert!(
            g > 1 || distance(&trained, &base) * 20.0 < distance(&trained, &sampler),
            "grow {g}: {} from base, {} from the sampler",
            distance(&trained, &base),
            distance(&trained, &sampler)
        );
    }
    // the second Grow samples with the first iteration's model
    assert_eq!(summary.grows[1].policy, summary.stages[1].model);
}

#[test]
fn bad_configurations_are_refused_with_a_message() {
    let root = scratch("rest-bad");
    setup(&root, 4);
    let mut c = small_config(&root, "bad");
    c.threshold_mode = ThresholdMode::Percentile;
    c.thresholds = vec![0.0, 90.0];
    let e = run(&c, false, &CPU).unwrap_err().to_string();
    assert!(e.contains("thresholds[1]") && e.contains("[0, 1]"), "{e}");
    let mut c = small_config(&root, "bad");
    c.fit.eval_file = Some(root.join("d.jsonl"));
    let e = run(&c, false, &CPU).unwrap_err().to_string();
    assert!(e.contains("eval_file"), "{e}");
    let mut c = small_config(&root, "bad");
    c.model = "".into();
    assert!(run(&c, false, &CPU)
        .unwrap_err()
        .to_string()
        .contains("`model`"));
    let mut c = small_config(&root, "bad");
    c.train_file = Some(root.join("missing.jsonl"));
    let e = run(&c, false, &CPU).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
}

/// ReST with LoRA: each Improve step trains fresh adapters on its starting policy, keeps the
/// best-validated ones (or the start's), and writes an adapter directory whose base is the step's
/// start, so the chain of steps loads back as one model.
#[test]
fn rest_with_lora_chains_adapter_directories() {
    let root = scratch("rest-lora");
    setup(&root, 12);
    let mut cfg = small_config(&root, "run");
    cfg.grow_steps = 2;
    cfg.thresholds = vec![0.0, 0.5];
    cfg.validation.prompts = 4;
    cfg.fit.lora = rlhf_lm::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: rlhf_lm::lora::TargetModules::Preset("all-linear".into()),
        modules_to_save: vec!["embed_tokens".into()],
        ..Default::default()
    };
    let summary = run(&cfg, false, &CPU).unwrap();
    let improve: Vec<_> = summary
        .stages
        .iter()
        .filter(|s| s.optimizer_steps > 0)
        .collect();
    assert!(improve.len() >= 2, "{} improve steps", improve.len());
    let mut previous = std::fs::canonicalize(root.join("init-5")).unwrap();
    for s in &improve {
        let cfg_path = s.model.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let base = std::path::PathBuf::from(v["base_model_name_or_path"].as_str().unwrap());
        assert_eq!(
            std::fs::canonicalize(&base).unwrap(),
            previous,
            "{}",
            s.model.display()
        );
        previous = std::fs::canonicalize(&s.model).unwrap();
        // Loads as a model (the chain merged), and trains on from there.
        let lm = TrainableLm::load(&s.model, &CPU).unwrap();
        assert!(lm.lora.is_none());
        assert!(lm.params.vars.iter().all(|(n, _)| !n.contains(".lora_")));
    }
}
