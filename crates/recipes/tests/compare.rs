//! compare-online's PPO configurations: the sample budget and the `ppo-plain` ablation.

use std::path::Path;

use rlhf_methods::ppo::RewardScaling;
use rlhf_recipes::compare::{ppo_config, CompareConfig};

fn cfg() -> CompareConfig {
    CompareConfig {
        samples_per_step: 64,
        steps: 10,
        ..CompareConfig::default()
    }
}

/// PPO's critic pre-training batches (rollouts of the initial policy) come out of its budget:
/// 4 pre-training batches + 6 PPO iterations, of 64 samples each = 640 = 64 x 10, like every
/// other method; pre-training never stops early, so the count is exact.
#[test]
fn ppo_critic_pretraining_is_charged_to_the_budget() {
    let c = ppo_config(&cfg(), "ppo", 0, Path::new("out")).unwrap();
    assert_eq!(c.method.critic_pretrain_iterations, 4);
    assert_eq!(c.method.critic_pretrain_tol, 0.0);
    assert_eq!(c.steps, 6);
    assert_eq!(c.prompts_per_step * c.rollout.k, 64);
    let samples = (c.steps + c.method.critic_pretrain_iterations as u64)
        * (c.prompts_per_step * c.rollout.k) as u64;
    assert_eq!(samples, 640);
    // ppo-plain has no pre-training: all 10 iterations are PPO iterations.
    let p = ppo_config(&cfg(), "ppo-plain", 0, Path::new("out")).unwrap();
    assert_eq!((p.steps, p.method.critic_pretrain_iterations), (10, 0));
    // A budget the pre-training alone would use up is refused.
    let small = CompareConfig { steps: 4, ..cfg() };
    let err = ppo_config(&small, "ppo", 0, Path::new("out"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("critic pre-training"), "{err}");
    assert!(ppo_config(&small, "ppo-plain", 0, Path::new("out")).is_ok());
}

/// `ppo-plain` is `ppo` with the PPO-max reward normalisation + clipping and critic pre-training
/// turned off (and the iterations that pre-training cost given back); nothing else differs, the
/// reward source's normalisation included.
#[test]
fn ppo_plain_differs_only_in_the_ppo_max_components() {
    let max = ppo_config(&cfg(), "ppo", 3, Path::new("out")).unwrap();
    let plain = ppo_config(&cfg(), "ppo-plain", 3, Path::new("out")).unwrap();
    assert_eq!(max.method.reward_scaling, RewardScaling::Normalize);
    assert!(max.method.reward_clip > 0.0);
    let mut want = max.clone();
    want.method.reward_scaling = RewardScaling::None;
    want.method.reward_clip = 0.0;
    want.method.critic_pretrain_iterations = 0;
    want.steps = 10;
    assert_eq!(
        serde_json::to_value(&plain).unwrap(),
        serde_json::to_value(&want).unwrap()
    );
    assert!(plain.reward.normalize);
}
