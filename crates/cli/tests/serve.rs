//! `rlhf serve` over loopback HTTP on the tiny fixture model. Answers are checked against
//! reference values computed here with the library (`generate`, `score`) or by `rlhf generate`,
//! never against the server itself.

mod common;
use common::rlhf;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use candle_core::Device;
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::Llama;
use rlhf_lm::Pretrained;
use serde_json::{json, Value};

const NAME: &str = "tiny";

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/tiny-llama")
}

/// A running `rlhf serve` on a free port, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(&tiny_model(), extra)
    }

    fn start_with(model: &Path, extra: &[&str]) -> Server {
        let mut child = rlhf()
            .args([
                "serve",
                "--served-model-name",
                NAME,
                "--port",
                "0",
                "--model",
            ])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, base }
    }

    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let mut response = agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    /// POST a JSON body that must succeed; the parsed response.
    fn ok(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, &body.to_string());
        assert_eq!(status, 200, "{body} -> {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut response = agent().get(format!("{}{path}", self.base)).call().unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// The fixture model, loaded here for reference values.
struct Reference {
    pretrained: Pretrained,
    llama: Llama,
}

impl Reference {
    fn load() -> Reference {
        let pretrained = Pretrained::load(&tiny_model(), &Device::Cpu).unwrap();
        let llama = pretrained.model(&Device::Cpu).unwrap();
        Reference { pretrained, llama }
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        self.pretrained.tokenizer.encode(text, true).unwrap()
    }

    /// Texts `generate` gives for these prompt rows in one call, with the server's settings.
    fn generate(&self, rows: &[Vec<u32>], params: SamplingParams) -> Vec<String> {
        let params = SamplingParams {
            eos_token_ids: self.pretrained.eos_token_ids(),
            ..params
        };
        generate(
            &self.llama,
            rows,
            self.pretrained.pad_id(),
            &params,
            Some(&self.pretrained.tokenizer),
        )
        .unwrap()
        .iter()
        .map(|s| self.pretrained.tokenizer.decode(&s.tokens, true).unwrap())
        .collect()
    }

    fn greedy(&self, prompt: &str, max_new_tokens: usize) -> String {
        self.generate(
            &[self.encode(prompt)],
            SamplingParams::greedy(max_new_tokens),
        )
        .remove(0)
    }
}

/// The `data:` payloads of a server-sent-event stream.
fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_string()
        })
        .collect()
}

#[test]
fn chat_matches_rlhf_generate_and_streams_the_same_text() {
    let server = Server::start(&[]);
    let (system, user) = (
        "you are a good assistant",
        "what is the capital of france ?",
    );
    let out = rlhf()
        .args(["generate", "--chat", "--json", "--max-new-tokens", "10"])
        .args(["--system", system, "--prompt", user, "--model"])
        .arg(tiny_model())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected_text = expected["completion"].as_str().unwrap();

    let request = json!({
        "model": NAME,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 10,
        "temperature": 0,
    });
    let v = server.ok("/v1/chat/completions", request.clone());
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], NAME);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected_text);
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    assert_eq!(v["usage"]["completion_tokens"], expected["num_tokens"]);
    let reference = Reference::load();
    let rendered = expected["prompt"].as_str().unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        reference.encode(rendered).len()
    );

    // OpenAI's list-of-parts content is the same message.
    let mut parts = request.clone();
    parts["messages"][1]["content"] = json!([{"type": "text", "text": user}]);
    let v = server.ok("/v1/chat/completions", parts);
    assert_eq!(v["choices"][0]["message"]["content"], expected_text);

    // Streamed: a role chunk, content deltas, a finish chunk, then [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) = server.post("/v1/chat/completions", &streamed.to_string());
    assert_eq!(status, 200, "{body}");
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected_text);
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        expected["num_tokens"]
    );

    // A stop string cuts the text before it, and the reason is "stop".
    let words: Vec<&str> = expected_text.split(' ').collect();
    if words.len() >= 3 {
        let mut stopped = request.clone();
        stopped["stop"] = json!([words[2]]);
        let v = server.ok("/v1/chat/completions", stopped);
        let cut = &expected_text[..expected_text.find(words[2]).unwrap()];
        assert_eq!(v["choices"][0]["message"]["content"], cut);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn echoed_prompt_logprobs_match_the_scorer() {
    let server = Server::start(&[]);
    let reference = Reference::load();
    let prompt = "the capital of france is paris .";
    let ids = reference.encode(prompt);
    let scored = rlhf_lm::score::score_pairs(
        &reference.llama,
        &[(ids[..1].to_vec(), ids[1..].to_vec())],
        reference.pretrained.pad_id(),
        1,
        1.0,
    )
    .unwrap()
    .remove(0);
    assert_eq!(scored.len(), ids.len() - 1);
    let check = |logprobs: &Value, extra: usize| {
        let lps = logprobs["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), ids.len() + extra);
        assert!(lps[0].is_null(), "the first token has no context");
        assert!(logprobs["top_logprobs"][0].is_null());
        for (got, want) in lps[1..ids.len()].iter().zip(&scored) {
            let got = got.as_f64().unwrap();
            assert!((got - *want as f64).abs() < 1e-5, "{got} vs {want}");
        }
        assert_eq!(logprobs["tokens"].as_array().unwrap().len(), lps.len());
        assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), lps.len());
        // Each position's alternatives hold the chosen token and the two most likely.
        let top = logprobs["top_logprobs"][1].as_object().unwrap();
        assert!(top.len() >= 2 && top.len() <= 3, "{top:?}");
    };

    // As text, nothing generated.
    let v = server.ok(
        "/v1/completions",
        json!({"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2}),
    );
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], prompt);
    check(&v["choices"][0]["logprobs"], 0);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);

    // As lm-evaluation-harness asks: token ids, a batch of them, one greedy token, echo.
    let ids_json: Vec<Value> = ids.iter().map(|&i| json!(i)).collect();
    let v = server.ok(
        "/v1/completions",
        json!({"model": NAME, "prompt": [ids_json, [5, 6]], "max_tokens": 1, "temperature": 0,
               "echo": true, "logprobs": 2, "seed": 1234}),
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[1]["index"], 1);
    check(&choices[0]["logprobs"], 1);
    // The generated token is the greedy one, so it is the most likely at its position.
    let last_lp = choices[0]["logprobs"]["token_logprobs"][ids.len()]
        .as_f64()
        .unwrap();
    let last_top = choices[0]["logprobs"]["top_logprobs"][ids.len()]
        .as_object()
        .unwrap();
    let best = last_top
        .values()
        .map(|x| x.as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(last_lp, best);
    let greedy_text = reference.greedy(prompt, 1);
    assert_eq!(
        choices[0]["text"].as_str().unwrap(),
        format!(
            "{}{greedy_text}",
            reference.pretrained.tokenizer.decode(&ids, true).unwrap()
        )
    );

    // Generated tokens' log-probs (no echo) are the sampler's at temperature 1.
    let params = SamplingParams {
        eos_token_ids: reference.pretrained.eos_token_ids(),
        ..SamplingParams::greedy(5)
    };
    let sample = generate(
        &reference.llama,
        std::slice::from_ref(&ids),
        reference.pretrained.pad_id(),
        &params,
        None,
    )
    .unwrap()
    .remove(0);
    let v = server.ok(
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 0}),
    );
    let lps = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(lps.len(), sample.tokens.len());
    for (got, want) in lps.iter().zip(&sample.logprobs) {
        assert!((got.as_f64().unwrap() - *want as f64).abs() < 1e-4);
    }
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let server = Server::start(&["--max-body-bytes", "16384", "--max-tokens-limit", "64"]);
    let error_of = |path: &str, body: &str, status: u16| -> Value {
        let (got, text) = server.post(path, body);
        assert_eq!(got, status, "{body:.200} -> {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
        v["error"].clone()
    };
    let chat = "/v1/chat/completions";
    let e = error_of(chat, "{\"messages\": [", 400);
    assert_eq!(e["type"], "invalid_request_error");
    let e = error_of(
        chat,
        r#"{"messages": [{"role": "user", "content": "w5"}], "temperature": "hot"}"#,
        400,
    );
    assert_eq!(e["param"], "temperature");
    let e = error_of(chat, r#"{"messages": "w5"}"#, 400);
    assert_eq!(e["param"], "messages");
    let e = error_of(chat, r#"{"model": "tiny"}"#, 400);
    assert_eq!(e["param"], "messages");
    let e = error_of(
        chat,
        r#"{"messages": [{"role": "user", "content": 5}]}"#,
        400,
    );
    assert_eq!(e["param"], "messages[0].content");
    let e = error_of(
        chat,
        r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "w5"}]}"#,
        400,
    );
    assert_eq!(e["code"], "model_not_found");
    let e = error_of(
        chat,
        r#"{"messages": [{"role": "user", "content": "w5"}], "max_tokens": 65}"#,
        400,
    );
    assert_eq!(e["param"], "max_tokens");
    let e = error_of(chat, "[1, 2]", 400);
    assert!(e["param"].is_null());

    let completions = "/v1/completions";
    let long_prompt = vec!["w9"; 300].join(" ");
    let e = error_of(
        completions,
        &json!({"prompt": long_prompt}).to_string(),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let e = error_of(completions, r#"{"prompt": [5, 999]}"#, 400);
    assert_eq!(e["param"], "prompt");
    let e = error_of(completions, r#"{"prompt": [[5], ["w5"]]}"#, 400);
    assert_eq!(e["param"], "prompt");
    let e = error_of(completions, r#"{"prompt": []}"#, 400);
    assert_eq!(e["param"], "prompt");
    let e = error_of(completions, r#"{"prompt": "w5", "n": 0}"#, 400);
    assert_eq!(e["param"], "n");
    let e = error_of(completions, r#"{"prompt": "w5", "logprobs": true}"#, 400);
    assert_eq!(e["param"], "logprobs");
    let e = error_of(completions, r#"{"prompt": "w5", "top_p": 0}"#, 400);
    assert_eq!(e["param"], "top_p");
    let e = error_of(completions, r#"{"prompt": "w5", "max_tokens": -1}"#, 400);
    assert_eq!(e["param"], "max_tokens");

    // Over the body limit: 413, still a JSON error.
    let huge = json!({"prompt": "w5 ".repeat(20_000)}).to_string();
    let e = error_of(completions, &huge, 413);
    assert_eq!(e["code"], "request_too_large");

    let (status, v) = server.get("/no/such/path");
    assert_eq!(status, 404);
    assert!(v["error"]["message"].is_string());

    // Still serving.
    let (status, v) = server.get("/health");
    assert_eq!((status, v), (200, json!({"status": "ok"})));
    let (status, v) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], NAME);
    server.ok(completions, json!({"prompt": "w5", "max_tokens": 2}));
}

#[test]
fn seeded_sampling_repeats_and_matches_the_library() {
    let server = Server::start(&[]);
    let reference = Reference::load();
    let prompt = "hello , how is the world";
    let request =
        json!({"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 2});
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    let first = texts(&server.ok("/v1/completions", request.clone()));
    let again = texts(&server.ok("/v1/completions", request));
    assert_eq!(first, again);
    // A seeded request is one `generate` call over its n rows with that seed.
    let ids = reference.encode(prompt);
    let expected = reference.generate(
        &[ids.clone(), ids],
        SamplingParams {
            max_new_tokens: 8,
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        },
    );
    assert_eq!(first, expected);
}

#[test]
fn concurrent_requests_each_get_their_own_answer() {
    const REQUESTS: usize = 200;
    const MAX_TOKENS: usize = 6;
    let server = Arc::new(Server::start(&[]));
    let reference = Reference::load();
    // Distinct prompts of 1 to 4 words, so batches mix lengths (and left padding): prompts of
    // one length differ in their first word.
    let prompts: Vec<String> = (0..REQUESTS)
        .map(|i| {
            (0..1 + i % 4)
                .map(|j| {
                    let id = 4 + if j == 0 {
                        i / 4
                    } else {
                        (i * 7 + j * 31) % 124
                    };
                    reference
                        .pretrained
                        .tokenizer
                        .id_to_token(id as u32)
                        .unwrap()
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let distinct: std::collections::HashSet<&String> = prompts.iter().collect();
    assert_eq!(distinct.len(), REQUESTS);
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| reference.greedy(p, MAX_TOKENS))
        .collect();

    let start = Arc::new(Barrier::new(REQUESTS));
    let handles: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let (server, start) = (server.clone(), start.clone());
            let body = json!({"model": NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
                              "temperature": 0})
            .to_string();
            std::thread::spawn(move || {
                start.wait();
                server.post("/v1/completions", &body)
            })
        })
        .collect();
    for ((handle, prompt), want) in handles.into_iter().zip(&prompts).zip(&expected) {
        let (status, text) = handle.join().unwrap();
        assert_eq!(status, 200, "{prompt}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want, "{prompt}");
    }
    let (_, stats) = server.get("/stats");
    assert!(
        stats["largest_shared_batch"].as_u64().unwrap() > 1,
        "no batching happened: {stats}"
    );
}

#[test]
fn a_full_queue_is_refused_with_503() {
    // One request decoding, one waiting: the rest of a simultaneous burst is refused.
    let server = Arc::new(Server::start(&["--max-queue", "1", "--max-batch", "1"]));
    const BURST: usize = 24;
    let start = Arc::new(Barrier::new(BURST));
    let body =
        json!({"prompt": "the day", "max_tokens": 200, "n": 8, "temperature": 0.8}).to_string();
    let handles: Vec<_> = (0..BURST)
        .map(|_| {
            let (server, start, body) = (server.clone(), start.clone(), body.clone());
            std::thread::spawn(move || {
                start.wait();
                server.post("/v1/completions", &body)
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(status, _)| *status == 503)
        .map(|(_, text)| text)
        .collect();
    assert!(!refused.is_empty(), "nothing was refused");
    assert!(answers.iter().all(|(s, _)| *s == 200 || *s == 503));
    let e: Value = serde_json::from_str(refused[0]).unwrap();
    assert_eq!(e["error"]["code"], "queue_full");
    // Once the burst is over, requests are taken again.
    server.ok(
        "/v1/completions",
        json!({"prompt": "the day", "max_tokens": 2}),
    );
}

/// A served reward model answers `/v1/rewards`, and the toolkit's own HTTP reward source
/// (`reward.source = "http"`) pointed at it gets the scores the reward model gives in process
/// to the same texts; a model without a head says it has none.
#[test]
fn a_served_reward_model_scores_for_the_http_reward_source() {
    use rlhf_rl::reward_source::{HttpSource, Query, RewardSource};
    let dir = std::env::temp_dir().join(format!("rlhf-serve-rm-{}", std::process::id()));
    let lm = rlhf_rl::policy::TrainableLm::load(&tiny_model(), &Device::Cpu).unwrap();
    let mut w = lm.snapshot().unwrap();
    rlhf_rl::reward::add_head(&mut w, lm.config.hidden_size, 3, &Device::Cpu).unwrap();
    let lm = rlhf_rl::policy::TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    rlhf_rl::reward::save(&lm, None, &dir).unwrap();
    let server = Server::start_with(&dir, &[]);
    let texts = [
        ("the cat", " is on the mat"),
        ("where is it", " in the box"),
        ("a", " b"),
    ];
    let queries: Vec<Query> = texts
        .iter()
        .map(|(p, c)| Query {
            prompt: p,
            completion: c,
            prompt_ids: &[],
            completion_ids: &[],
        })
        .collect();
    let source = HttpSource::new(
        "reward.url",
        &format!("{}/v1/rewards", server.base),
        Duration::from_secs(60),
        0,
        0.0,
    )
    .unwrap();
    let got = source.score(&queries).unwrap();
    let rm = rlhf_rl::reward::RewardModel::load(&dir, &Device::Cpu).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = texts
        .iter()
        .map(|(p, c)| {
            let (p, mut c) = rlhf_lm::score::encode_pair(&rm.tokenizer, p, c).unwrap();
            c.push(rm.tokenizer.eos_token_id().unwrap());
            (p, c)
        })
        .collect();
    let want = rm.score_raw(&rows, 8).unwrap();
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    assert!(
        (want[0] - want[1]).abs() > 1e-6,
        "the texts score alike: {want:?}"
    );
    // Mismatched lists are a 400 naming the field; a plain LM has no rewards to give.
    let (status, body) = server.post("/v1/rewards", r#"{"prompts": ["a"], "completions": []}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("completions"), "{body}");
    drop(server);
    let plain = Server::start(&[]);
    let (status, body) = plain.post("/v1/rewards", r#"{"prompts": ["a"], "completions": ["b"]}"#);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_a_reward_model"), "{body}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A run's LLM judge pointed at `rlhf serve` of the same model (`judge.url`) gives the judgements
/// the in-process judge gives (greedy, so both are deterministic).
#[test]
fn the_llm_judge_can_judge_through_the_server() {
    use rlhf_rl::judge::{judge_candidates, Judge, JudgeConfig, JudgePrompt};
    let server = Server::start(&[]);
    let p = Pretrained::load(&tiny_model(), &Device::Cpu).unwrap();
    let model = p.model(&Device::Cpu).unwrap();
    let judge = Judge {
        model: &model,
        tokenizer: &p.tokenizer,
        chat_template: None,
        pad_id: p.pad_id(),
        eos_ids: p.eos_token_ids(),
    };
    let local_cfg = JudgeConfig {
        template: Some("{prompt} {response} .".into()),
        prefill: Some("the".into()),
        chat: Some(false),
        judgements: 2,
        temperature: 0.0,
        top_p: None,
        max_new_tokens: Some(5),
        ..JudgeConfig::default()
    };
    let prompt = JudgePrompt::resolve(&local_cfg, false, None).unwrap();
    let items: Vec<(String, String)> = vec![
        ("where is the cat".into(), "on the mat".into()),
        ("what is it".into(), "a box".into()),
    ];
    let local = judge_candidates(&judge, &prompt, &local_cfg, &items, 3).unwrap();
    let remote_cfg = JudgeConfig {
        url: Some(server.base.clone()),
        ..local_cfg.clone()
    };
    let remote = judge_candidates(&judge, &prompt, &remote_cfg, &items, 3).unwrap();
    assert_eq!(local.replies.len(), 2);
    assert_eq!(local.replies, remote.replies);
    assert!(
        local.replies[0][0].0.len() > "the".len(),
        "{:?}",
        local.replies
    );
    // An unreachable judge is an error naming its endpoint.
    let bad = JudgeConfig {
        url: Some("http://127.0.0.1:9".into()),
        ..local_cfg
    };
    let e = judge_candidates(&judge, &prompt, &bad, &items, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("judge.url http://127.0.0.1:9/v1/completions"),
        "{e}"
    );
}
