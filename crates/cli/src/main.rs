//! The `rlhf` command. Model commands and pipelines are declared here; every training method's
//! command (name, help line, flags, `--print-config`) is generated from `rlhf_methods::registry`.

mod model_cmds;
mod plot_cmd;
mod serve;
mod train_cmds;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use rlhf_rl::registry::Registered;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Train language models from preferences"
)]
struct Cli {
    /// CPU threads (default: all cores; `generate` with small batches defaults to 1 on <= 2 cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where tensors live: `cpu` (the default) or `cuda:N` (builds with the `cuda` feature).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate completions for prompts.
    Generate(model_cmds::GenerateArgs),
    /// Per-token log-probs of completions given prompts.
    Score(model_cmds::ScoreArgs),
    /// Architecture, size, tokenizer and chat template of a model.
    Info(model_cmds::InfoArgs),
    /// Fold a LoRA adapter directory into its base model: a plain Hugging Face directory.
    Merge(model_cmds::MergeArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (chat and text completions, log-probs).
    Serve(serve::ServeArgs),
    /// Win-rate of a policy against a reference (gold and/or reward-model judge); writes eval.json.
    Eval(train_cmds::RunArgs),
    /// Write a built-in testbed task's data files and tokenizer.
    Testbed(train_cmds::TestbedArgs),
    /// The main job on the built-in testbed: task -> SFT -> reward model -> RLOO -> evaluation.
    Quickstart(train_cmds::RunArgs),
    /// Run every online method on a testbed task with the same sample budget over seeds; writes a
    /// Table-1-style markdown table.
    CompareOnline(train_cmds::RunArgs),
    /// ReST's Table 1 on a testbed task: every Grow/Improve stage over seeds, against online RLOO
    /// at an equal number of sampled completions; writes a markdown table.
    CompareRest(train_cmds::RunArgs),
    /// RLP end to end on a testbed task: policy -> n samples per prompt -> reward model refreshed
    /// on them (UML, SPG) -> policy again from SFT; win-rates and reward-model accuracies.
    Rlp(train_cmds::RunArgs),
    /// Several seeds' `rlhf rlp` reports as one table (mean and Student-t 95% interval over
    /// seeds): `--set 'reports=["runs/rlp-s0/report.json", ...]'`.
    RlpTable(train_cmds::RunArgs),
    /// The multi-turn study on the testbed's `dialogue` game over seeds: behaviour cloning,
    /// model-based RL with a learned user model, model-free RL against the scripted user, Dyna,
    /// a user model from 10% of the logs, a reward model over dialogues; writes a markdown table.
    CompareDialogue(train_cmds::RunArgs),
    /// The testbed `dialogue` game's scripted user as a command (JSON on stdin and stdout), for
    /// `dialogue-rl`'s `environment.source = "command"`.
    DialogueUser,
    /// Training curves of run directories as SVG: one run's every metric family, or several runs
    /// overlaid (`--metrics loss,kl` to choose).
    Plot(plot_cmd::PlotArgs),
}

/// `cpu` or `cuda:N`.
fn parse_device(spec: &str) -> Result<Device> {
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal: usize = match s.strip_prefix("cuda").unwrap_or("") {
                // Data parallelism: each rank on a node takes its own GPU.
                "" if rlhf_train::dist::world().size() > 1 => {
                    rlhf_train::dist::local_rank().unwrap_or(0)
                }
                "" => 0,
                rest => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("--device {s}: expected cuda or cuda:N"))?,
            };
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device {s}: this build has no CUDA support (build with `--features cuda`)"
                );
            }
            Device::new_cuda(ordinal).with_context(|| format!("--device {s}"))
        }
        s => bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

/// A registered method's subcommand: `--config`, `--set`, `--resume`, `--print-config` and its
/// shorthand flags.
fn method_command(m: &'static dyn Registered) -> clap::Command {
    let mut c = clap::Command::new(m.name())
        .about(m.about())
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help("TOML configuration file (see --print-config for every key)"),
        )
        .arg(
            Arg::new("set")
                .long("set")
                .value_name("KEY=VALUE")
                .action(ArgAction::Append)
                .help("Override a configuration key: --set optim.lr=1e-4 (repeatable)"),
        )
        .arg(
            Arg::new("resume")
                .long("resume")
                .action(ArgAction::SetTrue)
                .help("Continue the run in output_dir from its latest checkpoint"),
        )
        .arg(
            Arg::new("print-config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help(
                    "Print the fully defaulted configuration as TOML, a comment per key, and exit",
                ),
        );
    for (flag, key, help) in m.shorthands() {
        c = c.arg(
            Arg::new(*flag)
                .long(*flag)
                .value_name("VALUE")
                .help(format!("{help} (the same as --set {key}=VALUE)")),
        );
    }
    c
}

fn run_method(m: &'static dyn Registered, a: &ArgMatches, device: &Device) -> Result<()> {
    if a.get_flag("print-config") {
        print!("{}", m.print_config()?);
        return Ok(());
    }
    let file = a.get_one::<std::path::PathBuf>("config");
    let mut sets: Vec<String> = a
        .get_many::<String>("set")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    for (flag, key, _) in m.shorthands() {
        if let Some(v) = a.get_one::<String>(flag) {
            sets.push(format!("{key}={v}"));
        }
    }
    let summary = m
        .run(
            file.map(|p| p.as_path()),
            &sets,
            a.get_flag("resume"),
            device,
        )
        .context(m.name())?;
    if rlhf_train::dist::world().is_root() {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

fn main() {
    match real_main() {
        Ok(()) => rlhf_train::dist::finalize(),
        Err(e) => {
            let world = rlhf_train::dist::world();
            if world.size() > 1 {
                eprintln!("error (rank {} of {}): {e:#}", world.rank(), world.size());
                // The other ranks would wait for this one in their next collective forever.
                rlhf_train::dist::abort_all(1);
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::exit(1);
        }
    }
}

/// The default thread count: every core, shared among the ranks a launcher started on this node.
fn default_threads() -> usize {
    let cores = rlhf_lm::available_cores();
    match rlhf_train::dist::local_ranks() {
        Some(n) if rlhf_train::dist::world().size() > 1 => (cores / n).max(1),
        _ => cores,
    }
}

fn real_main() -> Result<()> {
    let mut cmd = Cli::command();
    for m in rlhf_methods::registry() {
        cmd = cmd.subcommand(method_command(m));
    }
    let matches = cmd.get_matches();
    // Under mpirun / srun: join the other ranks (data parallelism) before any work.
    rlhf_train::dist::init()?;
    let device = parse_device(
        matches
            .get_one::<String>("device")
            .map_or("cpu", |s| s.as_str()),
    )?;
    let threads_arg = matches.get_one::<usize>("threads").copied();
    if let Some((name, sub)) = matches.subcommand() {
        if let Some(m) = rlhf_methods::method(name) {
            rlhf_lm::set_threads(threads_arg.unwrap_or_else(default_threads));
            return run_method(m, sub, &device);
        }
    }
    let cli = Cli::from_arg_matches(&matches)?;
    let threads = cli.threads.unwrap_or_else(|| match &cli.command {
        // The testbed's tiny model: synchronising two threads costs more than it gains.
        Command::Quickstart(_)
        | Command::CompareOnline(_)
        | Command::CompareRest(_)
        | Command::Rlp(_)
        | Command::CompareDialogue(_) => 1,
        _ => default_threads(),
    });
    rlhf_lm::set_threads(threads);
    match cli.command {
        Command::Generate(a) => model_cmds::generate(a, &device),
        Command::Score(a) => model_cmds::score(a, &device),
        Command::Info(a) => model_cmds::info(a, &device),
        Command::Merge(a) => model_cmds::merge(a, &device),
        Command::Serve(a) => serve::serve(a, &device),
        Command::Eval(a) => train_cmds::eval(a, &device),
        Command::Testbed(a) => train_cmds::testbed(a),
        Command::Quickstart(a) => train_cmds::quickstart(a, &device),
        Command::CompareOnline(a) => train_cmds::compare_online(a, &device),
        Command::CompareRest(a) => train_cmds::compare_rest(a, &device),
        Command::Rlp(a) => train_cmds::rlp(a, &device),
        Command::RlpTable(a) => train_cmds::rlp_table(a),
        Command::CompareDialogue(a) => train_cmds::compare_dialogue(a, &device),
        Command::DialogueUser => train_cmds::dialogue_user(),
        Command::Plot(a) => plot_cmd::plot(a),
    }
}
