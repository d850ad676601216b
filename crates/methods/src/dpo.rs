//! Offline preference optimisation on pairs: DPO, IPO, cDPO, SimPO and ORPO (`rlhf dpo --loss`).
//!
//! Each step scores the chosen and the rejected completions of a batch in one forward pass (the
//! rows `[chosen...; rejected...]`, as TRL's concatenated forward), sums their token log-probs and
//! hands them to the loss in [`rlhf_rl::pref_losses`]. The reference policy's log-probs (DPO, IPO,
//! cDPO) are computed once, before the first step, with the frozen reference (`ref_model`, default
//! the initial `model`), kept in memory and cached in the run directory (`ref_logps.json`), so a
//! resumed run reuses them and no reference model is held during training. SimPO and ORPO are
//! reference-free and never load or score one.
//!
//! Metrics (TRL's names): `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected` (+ ORPO's `nll_loss`, `log_odds_ratio`,
//! `log_odds_chosen`), `lr`, `grad_norm`, `epoch`; with an `eval_file` the same with `eval_`.
//! With `[eval]` set (a testbed task or prompts), the final policy is evaluated against the
//! reference policy and `eval.json` is written in the run directory.

use rlhf_rl::registry::{Entry, Family};
use std::path::Path;

use candle_core::Device;
use rlhf_rl::pairs::load_pair_ids;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::pref::{train_on_pairs, DpoConfig, DpoSummary, PolicyEval};
use rlhf_rl::pref_losses::PairLossKind;
use rlhf_rl::trainer::OptimConfig;
use rlhf_train::Result;

/// Run as configured: load pairs from `train_file` and train.
pub fn run(cfg: &DpoConfig, resume: bool, device: &Device) -> Result<DpoSummary> {
    cfg.validate()?;
    let lm = TrainableLm::load(&cfg.model, device)?;
    let train = load_pair_ids(&lm, &cfg.train_file, cfg.max_len, cfg.skip_bad_lines)?;
    let eval = cfg
        .eval_file
        .as_ref()
        .map(|p| load_pair_ids(&lm, p, cfg.max_len, cfg.skip_bad_lines))
        .transpose()?;
    train_on_pairs(cfg, lm, train, eval, resume, device)
}

/// The settings the testbed's tiny model trains well with (measured in `docs/dpo.md`): a pair
/// loss from the SFT policy on the simulated annotators' pairs over SFT samples (the quickstart's
/// `data/prefs_train.jsonl`), 2 epochs of batches of 32 (DPO: beta 0.3 at lr 5e-4; the others their
/// default beta at lr 2e-4), evaluated on the task's eval prompts against the SFT policy (the same
/// reference samples as `rlhf compare-online`).
pub fn testbed_config(
    loss: PairLossKind,
    task: &str,
    sft_model: &Path,
    pairs: &Path,
    output_dir: &Path,
    seed: u64,
) -> DpoConfig {
    DpoConfig {
        model: sft_model.to_path_buf(),
        train_file: pairs.to_path_buf(),
        output_dir: output_dir.to_path_buf(),
        loss,
        epochs: 2,
        batch_size: 32,
        max_len: 64,
        save_every: 0,
        log_every: 10,
        seed,
        beta: (loss == PairLossKind::Dpo).then_some(0.3),
        optim: OptimConfig {
            lr: if loss == PairLossKind::Dpo {
                5e-4
            } else {
                2e-4
            },
            ..OptimConfig::default()
        },
        // As `rlhf compare-online` evaluates (16 new tokens, eval seed 12345, batches of 64):
        // the same SFT reference samples, so the rows compare.
        eval: PolicyEval {
            task: Some(task.to_string()),
            max_new_tokens: Some(16),
            ..PolicyEval::default()
        },
        ..DpoConfig::default()
    }
}

/// `rlhf dpo`.
pub static ENTRY: Entry<DpoConfig, DpoSummary> = Entry {
    name: "dpo",
    about: "Offline preference optimisation on pairs: DPO, IPO, cDPO, SimPO, ORPO (`--loss`).",
    family: Family::Offline,
    shorthands: &[(
        "loss",
        "loss",
        "The pair loss: dpo | ipo | cdpo | simpo | orpo",
    )],
    run,
};
