//! The shared pieces every method stands on, written once, in the order data flows through them:
//!
//! - [`policy`]: the model being trained, its tokenizer and TRL-style encoding;
//!   [`pairs`]: training rows and preference pairs as token ids;
//! - [`rollout`]: the rollout engine (k samples per prompt, scored, reference log-probs);
//!   [`conversation`], [`dialogue`]: conversations as episodes through the chat template, and the
//!   multi-turn rollout engine with its user simulators (scripted, command/HTTP, a learned model);
//!   [`reward`], [`reward_source`]: reward models and where scores come from (reward model, task
//!   gold on explicit request, a command, an HTTP endpoint); [`judge`], [`preferences`]: labellers
//!   (an LLM judge, simulated annotators);
//! - [`kl`]: KL estimators, KL-shaped rewards and the KL controller;
//! - [`objectives`], [`losses`], [`pref_losses`]: NLL, policy-gradient, pair and KTO losses;
//!   [`value`]: the learned value model; [`mib`]: RLP-UML's multi-view information bottleneck
//!   (Gaussian heads, symmetric KL, JS MI estimator); [`spg`]: RLP-SPG's clustering and synthetic
//!   pairs;
//! - [`trainer`]: optimiser + schedule + clipping + run directory + checkpoints for any parameter
//!   set; [`fit`]: the one in-memory epoch loop; [`online`]: the session every online method runs in;
//!   [`pref`]: training on preference pairs with a pair loss;
//! - [`sampling`]: batched sampling every consumer draws through; [`eval`], [`best_of_n`]:
//!   win-rates against a reference policy.
//!
//! Nothing here imports a method (`rlhf-methods`), and methods import only from here.

pub mod best_of_n;
pub mod conversation;
pub mod dialogue;
pub mod eval;
pub mod fit;
pub mod judge;
pub mod kl;
pub mod losses;
pub mod mib;
pub mod objectives;
pub mod online;
pub mod pairs;
pub mod policy;
pub mod policy_samples;
pub mod pref;
pub mod pref_losses;
pub mod preferences;
pub mod registry;
pub mod reward;
pub mod reward_source;
pub mod rollout;
pub mod sampling;
pub mod spg;
pub mod trainer;
pub mod tripwire;
pub mod value;
