//! compare-online's rows come from the registry: the sample budget (PPO's critic pre-training
//! charged to it) and the `ppo-plain` variant.

use std::path::Path;

use rlhf_recipes::compare::{run_settings, CompareConfig};

fn cfg() -> CompareConfig {
    CompareConfig {
        samples_per_step: 64,
        steps: 10,
        ..CompareConfig::default()
    }
}

/// The configuration a comparison row runs with, as a TOML table.
fn resolved(c: &CompareConfig, name: &str, seed: u64) -> toml::Table {
    let (m, sets) = run_settings(c, name, seed, Path::new("out")).unwrap();
    toml::from_str(&m.resolved_toml(None, &sets).unwrap()).unwrap()
}

fn int(t: &toml::Table, path: &[&str]) -> i64 {
    let mut v = &t[path[0]];
    for k in &path[1..] {
        v = &v[*k];
    }
    v.as_integer().unwrap_or_else(|| panic!("{path:?}: {v}"))
}

/// PPO's critic pre-training batches (rollouts of the initial policy) come out of its budget:
/// 4 pre-training batches + 6 PPO iterations, of 64 samples each = 640 = 64 x 10, like every
/// other method; pre-training never stops early, so the count is exact.
#[test]
fn ppo_critic_pretraining_is_charged_to_the_budget() {
    let c = resolved(&cfg(), "ppo", 0);
    assert_eq!(int(&c, &["method", "critic_pretrain_iterations"]), 4);
    assert_eq!(c["method"]["critic_pretrain_tol"].as_float(), Some(0.0));
    assert_eq!(int(&c, &["steps"]), 6);
    let per_step = int(&c, &["prompts_per_step"]) * int(&c, &["rollout", "k"]);
    assert_eq!(per_step, 64);
    assert_eq!((6 + 4) * per_step, 640);
    // ppo-plain has no pre-training: all 10 iterations are PPO iterations.
    let p = resolved(&cfg(), "ppo-plain", 0);
    assert_eq!(
        (
            int(&p, &["steps"]),
            int(&p, &["method", "critic_pretrain_iterations"])
        ),
        (10, 0)
    );
    // Methods without a critic run every iteration, and k samples per prompt keep the budget.
    let r = resolved(&cfg(), "rloo-k4", 0);
    assert_eq!(
        (
            int(&r, &["steps"]),
            int(&r, &["prompts_per_step"]),
            int(&r, &["rollout", "k"])
        ),
        (10, 16, 4)
    );
    // A budget the pre-training alone would use up is refused.
    let small = CompareConfig { steps: 4, ..cfg() };
    let err = run_settings(&small, "ppo", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("critic pre-training"), "{err}");
    assert!(run_settings(&small, "ppo-plain", 0, Path::new("out")).is_ok());
    // Unknown names list what there is.
    let err = run_settings(&cfg(), "sft", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown online method `sft`") && err.contains("ppo-plain"),
        "{err}"
    );
}

/// `ppo-plain` is `ppo` with the PPO-max reward normalisation + clipping and critic pre-training
/// turned off (and the iterations that pre-training cost given back); nothing else differs, the
/// reward source's normalisation included.
#[test]
fn ppo_plain_differs_only_in_the_ppo_max_components() {
    let max = resolved(&cfg(), "ppo", 3);
    let plain = resolved(&cfg(), "ppo-plain", 3);
    assert_eq!(max["method"]["reward_scaling"].as_str(), Some("normalize"));
    assert!(max["method"]["reward_clip"].as_float().unwrap() > 0.0);
    let mut want = max.clone();
    let m = want["method"].as_table_mut().unwrap();
    m.insert("reward_scaling".into(), "none".into());
    m.insert("reward_clip".into(), 0.0.into());
    m.insert("critic_pretrain_iterations".into(), 0.into());
    // Without pre-training the tolerance is left at its default.
    m.insert(
        "critic_pretrain_tol".into(),
        plain["method"]["critic_pretrain_tol"].clone(),
    );
    want.insert("steps".into(), 10.into());
    assert_eq!(plain, want);
    assert_eq!(plain["reward"]["normalize"].as_bool(), Some(true));
    // The shared settings reach every method.
    let grpo = resolved(&cfg(), "grpo-k4", 3);
    assert_eq!(grpo["kl"]["beta"].as_float(), Some(cfg().grpo_beta));
    assert_eq!(max["method"]["value_lr"].as_float(), Some(cfg().value_lr));
}

/// A variant of the config is its method plus its own overrides, applied after the shared
/// settings (its critic learning rate wins over the shared `value_lr`); it cannot name another
/// variant of the config or an unknown method.
#[test]
fn config_variants_resolve_to_their_method_with_their_overrides() {
    let mut c = cfg();
    c.lr = 1e-4;
    c.variants.insert(
        "ppo-no-token-kl".into(),
        rlhf_recipes::compare::VariantConfig {
            method: "ppo".into(),
            set: vec![
                "method.token_kl=false".into(),
                "method.value_lr=3e-5".into(),
            ],
        },
    );
    c.variants.insert(
        "raft-fast".into(),
        rlhf_recipes::compare::VariantConfig {
            method: "raft-k8".into(),
            set: vec!["optim.lr=5e-4".into()],
        },
    );
    let v = resolved(&c, "ppo-no-token-kl", 0);
    assert_eq!(v["method"]["token_kl"].as_bool(), Some(false));
    assert_eq!(v["method"]["value_lr"].as_float(), Some(3e-5));
    // Still PPO-max otherwise: its pre-training is charged to the budget.
    assert_eq!(int(&v, &["steps"]), 6);
    assert_eq!(v["optim"]["lr"].as_float(), Some(1e-4));
    let r = resolved(&c, "raft-fast", 0);
    assert_eq!(r["optim"]["lr"].as_float(), Some(5e-4));
    assert_eq!(
        (int(&r, &["rollout", "k"]), int(&r, &["prompts_per_step"])),
        (8, 8)
    );
    // The plain method keeps the shared settings.
    let p = resolved(&c, "ppo", 0);
    assert_eq!(p["method"]["token_kl"].as_bool(), Some(true));
    assert_eq!(p["method"]["value_lr"].as_float(), Some(1e-4));

    c.variants.insert(
        "nested".into(),
        rlhf_recipes::compare::VariantConfig {
            method: "raft-fast".into(),
            set: vec![],
        },
    );
    let err = run_settings(&c, "nested", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("variant `nested`"), "{err}");
    c.variants.insert(
        "typo".into(),
        rlhf_recipes::compare::VariantConfig {
            method: "rlooo".into(),
            set: vec![],
        },
    );
    let err = run_settings(&c, "typo", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("variant `typo`") && err.contains("unknown online method `rlooo`"),
        "{err}"
    );
    // A bad override is refused with the key named, before any run starts.
    c.variants.insert(
        "bad".into(),
        rlhf_recipes::compare::VariantConfig {
            method: "ppo".into(),
            set: vec!["method.no_such_key=1".into()],
        },
    );
    let err = run_settings(&c, "bad", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_key"), "{err}");
}
