//! What a method declares about itself so that the command line, `compare-online` and the help
//! text can be generated from one list (`rlhf_methods::registry`): its command name, a one-line
//! description, its configuration type (defaults, TOML file, `--set` overrides, the documented
//! `--print-config`), and its run function.

use std::path::Path;

use candle_core::Device;
use rlhf_train::config::{documented_toml, resolve};
use rlhf_train::Result;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Which family a method belongs to (online methods share `OnlineConfig` and can be compared under
/// one sample budget by `compare-online`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Trains on a fixed data set (SFT, reward model, DPO, KTO).
    Offline,
    /// Samples from the current policy every iteration (`OnlineConfig`).
    Online,
    /// Rounds of sampling, labelling and offline training (online DPO, self-rewarding).
    Iterative,
}

/// A method as the command line sees it.
pub trait Registered: Sync {
    /// The command name (`rlhf <name>`).
    fn name(&self) -> &'static str;
    /// One line for `rlhf --help`.
    fn about(&self) -> &'static str;
    fn family(&self) -> Family;
    /// Command-line flags that are shorthands for a configuration key (`--loss ipo` is
    /// `--set loss=ipo`), as (flag, key, help).
    fn shorthands(&self) -> &'static [(&'static str, &'static str, &'static str)];
    /// The fully defaulted configuration as TOML with a comment per key.
    fn print_config(&self) -> Result<String>;
    /// The resolved configuration (defaults < `file` < `sets`) as TOML, without running.
    fn resolved_toml(&self, file: Option<&Path>, sets: &[String]) -> Result<String>;
    /// Resolve the configuration (defaults < `file` < `sets`) and run; returns the run's summary.
    fn run(
        &self,
        file: Option<&Path>,
        sets: &[String],
        resume: bool,
        device: &Device,
    ) -> Result<serde_json::Value>;
}

impl std::fmt::Debug for dyn Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "method `{}`", self.name())
    }
}

/// A method's registration: its configuration type `C` and summary type `S` are those of `run`.
pub struct Entry<C: 'static, S: 'static> {
    pub name: &'static str,
    pub about: &'static str,
    pub family: Family,
    pub shorthands: &'static [(&'static str, &'static str, &'static str)],
    pub run: fn(&C, bool, &Device) -> Result<S>,
}

impl<C, S> Registered for Entry<C, S>
where
    C: Serialize + DeserializeOwned + Default + JsonSchema + 'static,
    S: Serialize + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn family(&self) -> Family {
        self.family
    }
    fn shorthands(&self) -> &'static [(&'static str, &'static str, &'static str)] {
        self.shorthands
    }
    fn print_config(&self) -> Result<String> {
        documented_toml::<C>()
    }
    fn resolved_toml(&self, file: Option<&Path>, sets: &[String]) -> Result<String> {
        let cfg: C = resolve(file, sets)?;
        toml::to_string(&cfg)
            .map_err(|e| rlhf_train::TrainError::invalid(format!("{}: {e}", self.name)))
    }
    fn run(
        &self,
        file: Option<&Path>,
        sets: &[String],
        resume: bool,
        device: &Device,
    ) -> Result<serde_json::Value> {
        let cfg: C = resolve(file, sets)?;
        let summary = (self.run)(&cfg, resume, device)?;
        serde_json::to_value(&summary)
            .map_err(|e| rlhf_train::TrainError::invalid(format!("{}: summary: {e}", self.name)))
    }
}
