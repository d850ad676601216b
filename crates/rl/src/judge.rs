//! An LLM-as-a-judge labeller (self-rewarding, Yuan et al. 2024; spec §5.8): a judge prompt (an
//! additive 0-5 rubric ending in "Score: n"), several sampled judgements averaged per candidate,
//! the score parser with parse accounting, and the evaluation-fine-tuning (EFT) data that teaches a
//! model to judge. Online DPO and self-rewarding label their pairs with it.
//!
//! Parsing is robust but strict about what counts: the last "score" (any case) followed by an
//! optional `:`/`=`/`-` (or `is`, `of`, `would be`), optional markdown emphasis, and a number in
//! [0, 5] (`Score: 3`, `**Score:** 4.5`, `score = 4/5`, `the score is 4 out of 5`); a number out of
//! range or on another scale (`7/10`) makes that verdict unparsable. Anything else is unparsable: it is counted and dropped, and a candidate none of
//! whose judgements parse is left out of the pairing.
//!
//! On the built-in testbed a tiny model knows no rubric, so, as the paper's M1 is SFT on
//! instruction data plus EFT judge data, `[eft]` first fine-tunes the model on the task's
//! demonstrations plus judge examples (short template `{prompt} {response} .`, reply prefilled with
//! `score :`). Their scores come from what a user would have, never from the gold reward: each
//! prompt gets `candidates` SFT samples, every two of them are compared by the simulated
//! annotators (noisy pairwise labels), and a candidate's score is the share of the others it beat,
//! on 0-5 ([`win_scores`]). The self-rewarding loop itself sees no labels at all.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::Task;
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::{ChatTemplate, Message, Tokenizer};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::fit::{fit, FitPlan};
use crate::objectives::nll_share;
use crate::pairs::load_rows;
use crate::sampling::sample;
use crate::trainer::{OptimConfig, Trainer};

/// The additive 0-5 rubric (our paraphrase of the paper's), for real instruction-following models.
pub const RUBRIC_TEMPLATE: &str = "Review the user's question and the corresponding response below, \
and score the response out of 5 with this additive system, adding points one at a time:
- Add 1 point if the response is relevant and gives some information related to the question, even if incomplete or with some irrelevant content.
- Add a 2nd point if it addresses a substantial part of the question but does not completely answer it.
- Add a 3rd point if it answers the basic elements of the question usefully, whatever its style.
- Add a 4th point if it is clearly written from an AI assistant's perspective, addresses the question directly and comprehensively, and is well organised and helpful, even with slight room for improvement.
- Add a 5th point if it is impeccably tailored to the question, without extraneous information, reflecting expert knowledge and a high-quality, engaging, insightful answer.

Question: {prompt}
Response: {response}

After examining the question and the response, briefly justify your total score in up to 100 words, \
then conclude with the score on its own line in the form \"Score: <total points>\".";

/// The testbed's short judge prompt (every word but `score` is in its vocabulary).
pub const TESTBED_TEMPLATE: &str = "{prompt} {response} .";
pub const TESTBED_PREFILL: &str = "score :";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeConfig {
    /// A separate judge model; none: the current policy judges itself (self-rewarding).
    pub model: Option<PathBuf>,
    /// The judge prompt with `{prompt}` and `{response}`; default: the 0-5 rubric, or the short
    /// testbed form when a testbed `task` is set.
    pub template: Option<String>,
    /// Or read the template from a file.
    pub template_file: Option<PathBuf>,
    /// Text the judge's reply starts with (placed after the prompt, parsed with the reply);
    /// default: none, or `score :` on the testbed.
    pub prefill: Option<String>,
    /// Render the judge prompt as a user message with the judge's chat template (default: when it
    /// has one).
    pub chat: Option<bool>,
    /// Sampled judgements per candidate, averaged (the paper: 3).
    pub judgements: usize,
    /// Sampling temperature of the judgements.
    pub temperature: f64,
    /// Nucleus sampling of the judgements (unset: off).
    pub top_p: Option<f64>,
    /// Default: 256 (rubric), 3 (testbed).
    pub max_new_tokens: Option<usize>,
    /// Longer judge prompts keep their last tokens.
    pub max_prompt_len: usize,
    /// Judge prompts per generation batch.
    pub batch_size: usize,
    /// Judge through an OpenAI-compatible server instead of in process (`rlhf serve` of the judge
    /// model, vLLM, ...): its base URL, `http://HOST:PORT`. The judge prompts are rendered and
    /// tokenised here as for a local judge and sent as token ids to `/v1/completions`, so the
    /// server must serve the same model (tokenizer) the run names as its judge.
    pub url: Option<String>,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            model: None,
            template: None,
            template_file: None,
            prefill: None,
            chat: None,
            judgements: 3,
            temperature: 0.7,
            top_p: Some(0.9),
            max_new_tokens: None,
            max_prompt_len: 2048,
            batch_size: 16,
            url: None,
        }
    }
}

/// A judge prompt ready to fill: template, prefill, whether to wrap it in the chat template.
#[derive(Debug, Clone)]
pub struct JudgePrompt {
    pub template: String,
    pub prefill: String,
    pub chat: bool,
    pub max_new_tokens: usize,
}

impl JudgePrompt {
    /// Resolve the configuration: `testbed` picks the short defaults.
    pub fn resolve(
        cfg: &JudgeConfig,
        testbed: bool,
        chat_template: Option<&ChatTemplate>,
    ) -> Result<Self> {
        let template = match (&cfg.template, &cfg.template_file) {
            (Some(_), Some(_)) => {
                return Err(TrainError::invalid(
                    "set judge.template or judge.template_file, not both",
                ))
            }
            (Some(t), None) => t.clone(),
            (None, Some(p)) => std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?,
            (None, None) if testbed => TESTBED_TEMPLATE.to_string(),
            (None, None) => RUBRIC_TEMPLATE.to_string(),
        };
        if !template.contains("{response}") {
            return Err(TrainError::invalid(
                "the judge template must contain {response} (and usually {prompt})",
            ));
        }
        let chat = cfg.chat.unwrap_or(chat_template.is_some() && !testbed);
        if chat && chat_template.is_none() {
            return Err(TrainError::invalid(
                "judge.chat = true but the judge model has no chat template",
            ));
        }
        Ok(JudgePrompt {
            template,
            prefill: cfg.prefill.clone().unwrap_or_else(|| {
                if testbed {
                    TESTBED_PREFILL.into()
                } else {
                    String::new()
                }
            }),
            chat,
            max_new_tokens: cfg.max_new_tokens.unwrap_or(if testbed { 3 } else { 256 }),
        })
    }

    /// The text the judge model is given (chat-rendered when `chat`), ending with the prefill.
    pub fn render(
        &self,
        prompt: &str,
        response: &str,
        chat_template: Option<&ChatTemplate>,
    ) -> Result<String> {
        let body = self
            .template
            .replace("{prompt}", prompt.trim())
            .replace("{response}", response.trim());
        let mut text = match (self.chat, chat_template) {
            (true, Some(t)) => t.render(&[Message::new("user", body)], true)?,
            _ => body,
        };
        if !self.prefill.is_empty() {
            if !text.ends_with(char::is_whitespace) && !self.chat {
                text.push(' ');
            }
            text.push_str(&self.prefill);
        }
        Ok(text)
    }
}

/// The judge's score in a reply: the last "score" followed by a number in [0, 5] (see the module
/// docs). `None` when there is none, or when the last one is out of range or not a number.
pub fn parse_score(text: &str) -> Option<f64> {
    let lower = text.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut last: Option<Option<f64>> = None;
    let mut from = 0;
    while let Some(pos) = lower[from..].find("score") {
        let start = from + pos;
        from = start + 5;
        // "scores", "scored", "scoreboard": not a verdict.
        if bytes.get(from).is_some_and(|b| b.is_ascii_alphabetic()) {
            continue;
        }
        let mut i = from;
        let skip = |i: &mut usize, set: &[u8]| {
            while *i < bytes.len() && set.contains(&bytes[*i]) {
                *i += 1;
            }
        };
        skip(&mut i, b" \t*_");
        if i < bytes.len() && b":=-".contains(&bytes[i]) {
            i += 1;
        } else {
            // "score is 4", "score of 4", "score would be 4".
            for word in ["is", "of", "would be", "will be"] {
                if lower[i..].starts_with(word)
                    && !bytes
                        .get(i + word.len())
                        .is_some_and(|b| b.is_ascii_alphanumeric())
                {
                    i += word.len();
                    break;
                }
            }
        }
        skip(&mut i, b" \t*_");
        let num_start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let num = lower[num_start..i].trim_end_matches('.');
        if num.is_empty() {
            // "score" mentioned without a number after it ("the score is"): not a verdict.
            continue;
        }
        let value = num.parse::<f64>().ok().filter(|v| (0.0..=5.0).contains(v));
        // A denominator other than 5 ("7/10") is another scale: unparsable.
        let rest = lower[i..].trim_start();
        let other_scale = rest
            .strip_prefix('/')
            .or_else(|| rest.strip_prefix("out of"))
            .map(|r| {
                let r = r.trim_start();
                let d: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
                d != "5"
            })
            .unwrap_or(false);
        last = Some(if other_scale { None } else { value });
    }
    last.flatten()
}

/// The judgements of a batch of candidates.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Judged {
    /// Per candidate: the mean of its parsed judgements, `None` when none parsed.
    pub scores: Vec<Option<f64>>,
    /// Per candidate: each judgement's reply (prefill included) and its parsed score.
    pub replies: Vec<Vec<(String, Option<f64>)>>,
    pub judgements: usize,
    pub parsed: usize,
}

impl Judged {
    pub fn parse_rate(&self) -> f64 {
        self.parsed as f64 / self.judgements.max(1) as f64
    }
}

/// A judge model with what it needs to generate.
pub struct Judge<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    pub pad_id: u32,
    pub eos_ids: Vec<u32>,
}

/// Judge each `(prompt, response)` `cfg.judgements` times and average the parsed scores.
pub fn judge_candidates(
    judge: &Judge,
    prompt: &JudgePrompt,
    cfg: &JudgeConfig,
    items: &[(String, String)],
    seed: u64,
) -> Result<Judged> {
    let n = cfg.judgements.max(1);
    let mut rows: Vec<(String, Vec<u32>)> = Vec::with_capacity(items.len() * n);
    for (p, r) in items {
        let text = prompt.render(p, r, judge.chat_template)?;
        let mut ids = judge.tokenizer.encode(&text, !prompt.chat)?;
        if ids.is_empty() {
            return Err(TrainError::invalid("empty judge prompt"));
        }
        if ids.len() > cfg.max_prompt_len {
            ids.drain(..ids.len() - cfg.max_prompt_len);
        }
        for _ in 0..n {
            rows.push((text.clone(), ids.clone()));
        }
    }
    let replies: Vec<String> = match &cfg.url {
        Some(url) => remote_judgements(url, &rows, n, prompt, cfg, seed)?,
        None => {
            let params = SamplingParams {
                max_new_tokens: prompt.max_new_tokens,
                temperature: cfg.temperature,
                top_p: cfg.top_p,
                seed,
                eos_token_ids: judge.eos_ids.clone(),
                ..Default::default()
            };
            sample(
                judge.model,
                judge.tokenizer,
                judge.pad_id,
                &rows,
                &params,
                cfg.batch_size,
            )?
            .into_iter()
            .map(|g| g.completion)
            .collect()
        }
    };
    let mut out = Judged::default();
    for chunk in replies.chunks(n) {
        let mut mine = Vec::with_capacity(n);
        for g in chunk {
            let reply = format!("{}{}", prompt.prefill, g);
            let s = parse_score(&reply);
            out.judgements += 1;
            out.parsed += s.is_some() as usize;
            mine.push((reply, s));
        }
        let ok: Vec<f64> = mine.iter().filter_map(|(_, s)| *s).collect();
        out.scores.push(if ok.is_empty() {
            None
        } else {
            Some(ok.iter().sum::<f64>() / ok.len() as f64)
        });
        out.replies.push(mine);
    }
    Ok(out)
}

/// The judgements of `rows` (each judge prompt `n` times in a row) from an OpenAI-compatible
/// server: one `/v1/completions` request per prompt, its token ids as the prompt and `n` choices
/// (seeded per prompt from `seed`), the replies in choice order.
fn remote_judgements(
    url: &str,
    rows: &[(String, Vec<u32>)],
    n: usize,
    prompt: &JudgePrompt,
    cfg: &JudgeConfig,
    seed: u64,
) -> Result<Vec<String>> {
    let endpoint = format!("{}/v1/completions", url.trim_end_matches('/'));
    let http = crate::reward_source::HttpSource::new(
        "judge.url",
        &endpoint,
        std::time::Duration::from_secs(600),
        0,
        0.0,
    )?;
    let fail = |why: String| TrainError::invalid(format!("judge.url {endpoint}: {why}"));
    let mut out = Vec::with_capacity(rows.len());
    for (i, (_, ids)) in rows.iter().step_by(n.max(1)).enumerate() {
        let mut body = serde_json::json!({
            "prompt": ids,
            "n": n,
            "max_tokens": prompt.max_new_tokens,
            "temperature": cfg.temperature,
            "seed": seed.wrapping_add(i as u64),
        });
        if let Some(p) = cfg.top_p {
            body["top_p"] = p.into();
        }
        let text = http.post(&body.to_string()).map_err(fail)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let mut choices: Vec<(u64, String)> = v["choices"]
            .as_array()
            .ok_or_else(|| fail("no `choices` in the response".into()))?
            .iter()
            .map(|c| {
                Ok((
                    c["index"].as_u64().unwrap_or(0),
                    c["text"]
                        .as_str()
                        .ok_or_else(|| fail("a choice without `text`".into()))?
                        .to_string(),
                ))
            })
            .collect::<Result<_>>()?;
        if choices.len() != n {
            return Err(fail(format!("{} choices for n = {n}", choices.len())));
        }
        choices.sort_by_key(|c| c.0);
        out.extend(choices.into_iter().map(|c| c.1));
    }
    Ok(out)
}

/// EFT: teach a testbed model to judge before the self-rewarding loop (the paper's M1 is SFT on
/// instruction data plus judge data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EftConfig {
    /// Judge examples to build (0: no EFT; the model judges as it is). Testbed only.
    pub examples: usize,
    /// Passes over the EFT data.
    pub epochs: usize,
    /// Learning rate of the EFT fine-tuning.
    pub lr: f64,
    /// Examples per EFT optimiser step.
    pub batch_size: usize,
    /// Also train on the task's demonstrations (so the policy keeps its instruction data).
    pub with_demonstrations: bool,
    /// Samples per prompt compared with each other by the annotators (>= 2; `examples` is
    /// rounded up to a multiple of it). 6: a candidate's wins over the other 5 are its score.
    pub candidates: usize,
}

impl Default for EftConfig {
    fn default() -> Self {
        EftConfig {
            examples: 0,
            epochs: 2,
            lr: 1e-3,
            batch_size: 32,
            with_demonstrations: true,
            candidates: 6,
        }
    }
}

/// Scores 0-5 by sextile of `values` (ties share a score), so every score is used.
pub fn sextile_scores(values: &[f64]) -> Vec<u8> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0u8; n];
    let mut first = 0;
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && values[i] != values[order[rank - 1]] {
            first = rank;
        }
        out[i] = ((6 * first) / n.max(1)).min(5) as u8;
    }
    out
}

/// Judge scores 0-5 from a round robin within groups of candidates for the same prompt: every two
/// candidates of a group are compared once with `prefer(prompt, a, b)` (true: `a` wins), identical
/// texts tie (half a win each, no comparison asked), and a candidate's score is
/// `round(5 * wins / (k - 1))` for a group of `k`. With `k = 6` the score is its number of wins.
/// In a complete round robin the win count orders candidates as a Bradley-Terry fit does.
/// Returns the scores in the candidates' order and the number of comparisons asked.
pub fn win_scores(
    groups: &[(&str, Vec<&str>)],
    prefer: &mut dyn FnMut(&str, &str, &str) -> bool,
) -> (Vec<u8>, usize) {
    let mut scores = Vec::new();
    let mut asked = 0;
    for (prompt, cands) in groups {
        let k = cands.len();
        let mut wins = vec![0.0f64; k];
        for i in 0..k {
            for j in i + 1..k {
                if cands[i] == cands[j] {
                    wins[i] += 0.5;
                    wins[j] += 0.5;
                } else {
                    asked += 1;
                    if prefer(prompt, cands[i], cands[j]) {
                        wins[i] += 1.0;
                    } else {
                        wins[j] += 1.0;
                    }
                }
            }
        }
        let denom = (k.max(2) - 1) as f64;
        scores.extend(
            wins.iter()
                .map(|w| (5.0 * w / denom).round().clamp(0.0, 5.0) as u8),
        );
    }
    (scores, asked)
}

/// Build the EFT file (`prompt` = judge prompt with prefill, `completion` = ` n`, plus the
/// demonstrations) from `policy` samples on the task's train prompts, scored by [`win_scores`]
/// over `prefer`'s pairwise labels (on the testbed: the simulated annotators'; `task.gold` is
/// never read here); returns the SFT'd model.
#[allow(clippy::too_many_arguments)]
pub fn eft_bootstrap(
    cfg: &EftConfig,
    judge_prompt: &JudgePrompt,
    task: &dyn Task,
    prefer: &mut dyn FnMut(&str, &str, &str) -> bool,
    model: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<PathBuf> {
    if cfg.candidates < 2 {
        return Err(TrainError::invalid(format!(
            "eft.candidates must be >= 2 (got {}): scores come from comparing candidates",
            cfg.candidates
        )));
    }
    let k = cfg.candidates;
    let n_groups = cfg.examples.div_ceil(k);
    let lm = crate::policy::TrainableLm::load(model, device)?;
    let policy = lm.model(device)?.detached();
    let mut prompts: Vec<(String, Vec<u32>)> = Vec::with_capacity(n_groups * k);
    for p in task.train_prompts().iter().cycle().take(n_groups) {
        let ids = lm.encode_prompt(p, 256)?;
        prompts.extend(std::iter::repeat_n((p.clone(), ids), k));
    }
    let params = SamplingParams {
        max_new_tokens: task.max_response_words() + 2,
        temperature: 1.0,
        seed: rlhf_train::rng::stream_seed(seed, "eft"),
        eos_token_ids: lm.eos_ids.clone(),
        ..Default::default()
    };
    let samples = sample(&policy, &lm.tokenizer, lm.pad_id, &prompts, &params, 64)?;
    let groups: Vec<(&str, Vec<&str>)> = samples
        .chunks(k)
        .map(|g| {
            (
                g[0].prompt.as_str(),
                g.iter().map(|x| x.completion.as_str()).collect(),
            )
        })
        .collect();
    let (scores, _) = win_scores(&groups, prefer);
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let file = out.join("eft.jsonl");
    let mut lines = String::new();
    for (g, s) in samples.iter().zip(&scores) {
        let p = judge_prompt.render(&g.prompt, &g.completion, lm.chat_template.as_ref())?;
        lines
            .push_str(&serde_json::json!({"prompt": p, "completion": format!(" {s}")}).to_string());
        lines.push('\n');
    }
    if cfg.with_demonstrations {
        for (p, r) in task.demonstrations() {
            lines.push_str(
                &serde_json::json!({"prompt": p, "completion": format!(" {r}")}).to_string(),
            );
            lines.push('\n');
        }
    }
    std::fs::write(&file, lines).map_err(|e| TrainError::io(&file, e))?;
    // Supervised fine-tuning on the EFT file (completion-only NLL, token mean over the batch).
    let optim = OptimConfig {
        lr: cfg.lr,
        schedule: rlhf_train::ScheduleKind::Cosine,
        warmup_ratio: 0.05,
        min_lr_ratio: 0.1,
        ..Default::default()
    };
    let mut lm = lm;
    let rows = load_rows(&lm, &file, 96, false)?;
    let mut plan = FitPlan::new("eft", cfg.epochs, cfg.batch_size, seed);
    plan.grad_accum = optim.grad_accum;
    let total = plan.total_steps(rows.len());
    let resolved = serde_json::json!({ "eft": cfg, "model": model, "seed": seed, "optim": optim });
    let mut trainer = Trainer::start(out, &resolved, &lm, &optim, total, false)?;
    fit(
        &mut trainer,
        &lm,
        rows.len(),
        &plan,
        |lm, batch, part| nll_share(lm, &rows, batch, part, device),
        |_, _| Ok(()),
    )?;
    lm.generation.max_new_tokens.get_or_insert(64);
    trainer.finish(&lm)?;
    Ok(out.join("model"))
}
