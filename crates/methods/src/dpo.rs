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

use candle_core::Device;
use rlhf_rl::fit::load_with_eval;
use rlhf_rl::pairs::load_pair_ids;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::pref::{train_on_pairs, DpoConfig, DpoSummary};
use rlhf_train::Result;

/// Run as configured: load pairs from `train_file` and train.
pub fn run(cfg: &DpoConfig, resume: bool, device: &Device) -> Result<DpoSummary> {
    cfg.validate()?;
    let lm = TrainableLm::load(&cfg.model, device)?;
    let (train, eval) = load_with_eval(&cfg.train_file, cfg.fit.eval_file.as_deref(), |p| {
        load_pair_ids(&lm, p, cfg.fit.max_len, cfg.fit.skip_bad_lines)
    })?;
    train_on_pairs(cfg, lm, train, eval, resume, device)
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
