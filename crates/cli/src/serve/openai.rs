//! The OpenAI wire format for `rlhf serve`: requests checked field by field into a [`Request`]
//! (every problem a 400 in OpenAI's error shape, naming the field), and model output turned into
//! `chat.completion`, `text_completion` and their streamed chunks.
//!
//! Bodies are read as untyped JSON and checked by hand rather than derived with serde, so that a
//! wrong type or value gets a message and a `param` that say which field and why, and so that
//! fields this server does not use (`user`, `frequency_penalty`, ...) are simply ignored.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::{Message, Pretrained, Tokenizer};
use serde_json::{json, Map, Value};

use super::engine::{finish_reason, LogprobRequest, RowOutput, Sharing, TokenLogprob};

/// Most alternatives a client may ask for at each position (`logprobs`, `top_logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most completions one request may ask for (`n`).
pub const MAX_N: u64 = 128;
/// Most rows (prompts times `n`) one request may put on the model.
pub const MAX_ROWS: usize = 1024;
/// Most stop strings in one request.
pub const MAX_STOP_STRINGS: usize = 16;
/// `max_tokens` when a completions request leaves it out: OpenAI's legacy default.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// An error response in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the request, naming the field at fault when there is one.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// A failure on the server's side (5xx).
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

/// What checking a request needs to know about the served model.
pub struct ModelContext {
    /// The name clients must send in `model` (when they send one).
    pub name: String,
    pub pretrained: Arc<Pretrained>,
    /// Prompt plus completion tokens may not exceed this (the model's position limit).
    pub context_length: usize,
    /// The most `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// One prompt, tokenised.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// What `echo` puts back: the prompt as sent, or its ids decoded when it came as ids.
    pub text: String,
}

/// A checked request, ready for the model.
#[derive(Debug, Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    pub prompts: Vec<Prompt>,
    /// Completions per prompt.
    pub n: usize,
    pub params: SamplingParams,
    pub sharing: Sharing,
    pub logprobs: Option<LogprobRequest>,
    /// `/v1/completions` only: put the prompt in front of each completion.
    pub echo: bool,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

impl Request {
    /// The model's rows: each prompt `n` times, prompt by prompt (choice `i` is row `i`).
    pub fn rows(&self) -> Vec<Vec<u32>> {
        self.prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.ids.clone(), self.n))
            .collect()
    }
}

// ---- reading fields ----------------------------------------------------------------------------

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        Some(key),
        format!("`{key}` must be {expected}, got {}", json_type(got)),
    )
}

/// Typed access to a request object's fields; `null` counts as absent, as OpenAI treats it.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn parse(body: &'a Value) -> Result<Self, ApiError> {
        match body {
            Value::Object(map) => Ok(Fields(map)),
            other => Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, got {}",
                    json_type(other)
                ),
            )),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a boolean", v)))
            .transpose()
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| wrong_type(key, "a number", v)))
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string", v)))
            .transpose()
    }
}

/// The settings both endpoints share.
struct Common {
    n: usize,
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn parse_common(f: &Fields, ctx: &ModelContext) -> Result<Common, ApiError> {
    if let Some(model) = f.string("model")? {
        if model != ctx.name {
            return Err(ApiError::invalid(
                Some("model"),
                format!(
                    "the model `{model}` does not exist; this server serves `{}`",
                    ctx.name
                ),
            )
            .with_code("model_not_found"));
        }
    }
    let n = f.uint("n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            Some("n"),
            format!("`n` must be between 1 and {MAX_N}, got {n}"),
        ));
    }
    // Left out, the model's generation_config.json decides (greedy when it says do_sample=false),
    // else OpenAI's default of 1.
    let defaults = &ctx.pretrained.generation;
    let default_temperature = match defaults.do_sample {
        Some(false) => 0.0,
        _ => defaults.temperature.unwrap_or(1.0),
    };
    let temperature = f.number("temperature")?.unwrap_or(default_temperature);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("`temperature` must be >= 0, got {temperature}"),
        ));
    }
    let top_p = match f.number("top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("`top_p` must be in (0, 1], got {p}"),
            ))
        }
        Some(1.0) => None,
        Some(p) => Some(p),
        None => defaults.top_p.filter(|&p| p > 0.0 && p < 1.0),
    };
    // vLLM's extension; 0 and -1 mean "no top-k" there too.
    let top_k = match f.get("top_k") {
        None => defaults.top_k.filter(|&k| k > 0),
        Some(v) => match v.as_i64() {
            Some(k) if k <= 0 => None,
            Some(k) => Some(k as usize),
            None => return Err(wrong_type("top_k", "an integer", v)),
        },
    };
    let seed = match f.get("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|s| s as u64))
                .ok_or_else(|| wrong_type("seed", "an integer", v))?,
        ),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong_type("stop", "a string or a list of strings", s))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("stop", "a string or a list of strings", other)),
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                stop.len()
            ),
        ));
    }
    // An empty stop string would end every completion before it starts.
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(options)) => Fields(options).bool("include_usage")?.unwrap_or(false),
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    Ok(Common {
        n: n as usize,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        stream,
        include_usage,
    })
}

/// How many tokens a request may generate, before it is checked.
struct TokenBudget {
    /// The client's value, and the field it came in (`max_tokens` or `max_completion_tokens`).
    requested: Option<(u64, &'static str)>,
    /// Used when the client gives none; `None`: whatever room the longest prompt leaves (capped
    /// at the limit).
    default: Option<usize>,
}

/// Check the token budget against the limit and every prompt against the context, and put the
/// settings together.
fn finish_request(
    endpoint: Endpoint,
    prompts: Vec<Prompt>,
    common: Common,
    budget: TokenBudget,
    logprobs: Option<LogprobRequest>,
    echo: bool,
    ctx: &ModelContext,
) -> Result<Request, ApiError> {
    let prompt_param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if prompts.len() * common.n > MAX_ROWS {
        return Err(ApiError::invalid(
            Some(prompt_param),
            format!(
                "{} prompts times n = {} asks for {} completions; the most one request may ask for is {MAX_ROWS}",
                prompts.len(),
                common.n,
                prompts.len() * common.n
            ),
        ));
    }
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let context = ctx.context_length;
    if longest >= context {
        return Err(context_error(prompt_param, longest, 0, context));
    }
    let max_tokens = match budget.requested {
        Some((m, param)) => {
            if m > ctx.max_tokens_limit as u64 {
                return Err(ApiError::invalid(
                    Some(param),
                    format!(
                        "`{param}` is {m}; this server allows at most {} (--max-tokens-limit)",
                        ctx.max_tokens_limit
                    ),
                ));
            }
            m as usize
        }
        None => budget
            .default
            .unwrap_or_else(|| (context - longest).min(ctx.max_tokens_limit)),
    };
    if longest + max_tokens > context {
        return Err(context_error(prompt_param, longest, max_tokens, context));
    }
    let sharing = if common.temperature == 0.0 {
        Sharing::Deterministic
    } else if common.seed.is_some() {
        Sharing::SeededAlone
    } else {
        Sharing::FreshSeed
    };
    Ok(Request {
        endpoint,
        prompts,
        n: common.n,
        params: SamplingParams {
            max_new_tokens: max_tokens,
            temperature: common.temperature,
            top_k: common.top_k,
            top_p: common.top_p,
            seed: common.seed.unwrap_or(0),
            stop_strings: common.stop,
            eos_token_ids: ctx.pretrained.eos_token_ids(),
        },
        sharing,
        logprobs,
        echo,
        stream: common.stream,
        include_usage: common.include_usage,
    })
}

fn context_error(param: &str, prompt: usize, completion: usize, context: usize) -> ApiError {
    ApiError::invalid(
        Some(param),
        format!(
            "this model's maximum context length is {context} tokens; the request needs {} \
             ({prompt} in the prompt, {completion} for the completion); shorten the prompt or \
             lower max_tokens",
            prompt + completion
        ),
    )
    .with_code("context_length_exceeded")
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))
}

fn encode(ctx: &ModelContext, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    let ids = ctx
        .pretrained
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::invalid(Some(param), e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            Some(param),
            "the prompt encodes to no tokens",
        ));
    }
    Ok(ids)
}

// ---- /v1/chat/completions ----------------------------------------------------------------------

/// Check a chat request and render its messages with the model's chat template (generation
/// prompt added), tokenised as `rlhf generate --chat` does.
pub fn parse_chat(body: &[u8], ctx: &ModelContext) -> Result<Request, ApiError> {
    let value = parse_json(body)?;
    let f = Fields::parse(&value)?;
    let messages = match f.get("messages") {
        None => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` is required",
            ))
        }
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must not be empty",
            ))
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(wrong_type("messages", "an array of messages", other)),
    };
    let common = parse_common(&f, ctx)?;
    let rendered = ctx
        .pretrained
        .render_chat(&messages, true)
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let ids = encode(ctx, &rendered, "messages")?;
    let requested = match f.uint("max_completion_tokens")? {
        Some(m) => Some((m, "max_completion_tokens")),
        None => f.uint("max_tokens")?.map(|m| (m, "max_tokens")),
    };
    if let Some((0, param)) = requested {
        return Err(ApiError::invalid(
            Some(param),
            format!("`{param}` must be at least 1"),
        ));
    }
    let top_logprobs = f.uint("top_logprobs")?;
    let logprobs = match (f.bool("logprobs")?.unwrap_or(false), top_logprobs) {
        (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "`top_logprobs` needs `logprobs` set to true",
            ))
        }
        (false, None) => None,
        (true, k) => Some(LogprobRequest {
            include_prompt: false,
            top: k.unwrap_or(0) as usize,
        }),
    };
    let prompt = Prompt {
        ids,
        text: rendered,
    };
    finish_request(
        Endpoint::Chat,
        vec![prompt],
        common,
        TokenBudget {
            requested,
            default: None,
        },
        logprobs,
        false,
        ctx,
    )
}

/// One chat message: a role and text content (a string, or OpenAI's list of text parts).
fn parse_message(index: usize, value: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{index}]");
    let Value::Object(map) = value else {
        return Err(wrong_type(&param, "an object", value));
    };
    let fields = Fields(map);
    let role_param = format!("{param}.role");
    let role = match fields.get("role") {
        None => {
            return Err(ApiError::invalid(
                Some(&role_param),
                format!("`{role_param}` is required"),
            ))
        }
        Some(Value::String(r)) => r.as_str(),
        Some(other) => return Err(wrong_type(&role_param, "a string", other)),
    };
    let role = match role {
        "system" | "user" | "assistant" => role,
        // OpenAI's newer name for the system role.
        "developer" => "system",
        other => {
            return Err(ApiError::invalid(
                Some(&role_param),
                format!(
                    "`{role_param}` must be system, developer, user or assistant, got {other:?}"
                ),
            ))
        }
    };
    let content_param = format!("{param}.content");
    let content = match fields.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let part_param = format!("{content_param}[{j}]");
                let text = part
                    .as_object()
                    .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                    .and_then(|p| p.get("text"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            Some(&part_param),
                            format!(
                                "`{part_param}` must be {{\"type\": \"text\", \"text\": \"...\"}}: \
                                 this server takes text only"
                            ),
                        )
                    })?;
                texts.push(text);
            }
            // As vLLM joins text parts.
            texts.join("\n")
        }
        // An assistant turn that only called tools has no content.
        None if role == "assistant" => String::new(),
        None => {
            return Err(ApiError::invalid(
                Some(&content_param),
                format!("`{content_param}` is required"),
            ))
        }
        Some(other) => {
            return Err(wrong_type(
                &content_param,
                "a string or a list of text parts",
                other,
            ))
        }
    };
    Ok(Message::new(role, content))
}

// ---- /v1/completions ---------------------------------------------------------------------------

/// Check a completions request: `prompt` as a string, a list of strings, a list of token ids or a
/// list of such lists.
pub fn parse_completion(body: &[u8], ctx: &ModelContext) -> Result<Request, ApiError> {
    let value = parse_json(body)?;
    let f = Fields::parse(&value)?;
    let prompts = parse_prompts(f.get("prompt"), ctx)?;
    let common = parse_common(&f, ctx)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = match f.get("logprobs") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_TOP_LOGPROBS => Some(LogprobRequest {
                include_prompt: echo,
                top: k as usize,
            }),
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
            None => {
                return Err(wrong_type(
                    "logprobs",
                    "an integer (the number of alternatives per token)",
                    v,
                ))
            }
        },
    };
    let requested = f.uint("max_tokens")?.map(|m| (m, "max_tokens"));
    finish_request(
        Endpoint::Completions,
        prompts,
        common,
        TokenBudget {
            requested,
            default: Some(DEFAULT_COMPLETION_TOKENS),
        },
        logprobs,
        echo,
        ctx,
    )
}

fn parse_prompts(value: Option<&Value>, ctx: &ModelContext) -> Result<Vec<Prompt>, ApiError> {
    const EXPECTED: &str =
        "a string, a list of strings, a list of token ids or a list of lists of token ids";
    let text_prompt = |text: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            ids: encode(ctx, text, "prompt")?,
            text: text.to_string(),
        })
    };
    match value {
        None => Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Value::String(text)) => Ok(vec![text_prompt(text)?]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid(
            Some("prompt"),
            "`prompt` must not be empty",
        )),
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text_prompt(text),
                    other => Err(wrong_type("prompt", EXPECTED, other)),
                })
                .collect(),
            Value::Number(_) => Ok(vec![token_prompt(items, ctx)?]),
            Value::Array(_) => items
                .iter()
                .map(|item| match item {
                    Value::Array(ids) if !ids.is_empty() => token_prompt(ids, ctx),
                    Value::Array(_) => Err(ApiError::invalid(
                        Some("prompt"),
                        "a token-id prompt must not be empty",
                    )),
                    other => Err(wrong_type("prompt", EXPECTED, other)),
                })
                .collect(),
            other => Err(wrong_type("prompt", EXPECTED, other)),
        },
        Some(other) => Err(wrong_type("prompt", EXPECTED, other)),
    }
}

/// A prompt given as token ids, each checked against the vocabulary.
fn token_prompt(items: &[Value], ctx: &ModelContext) -> Result<Prompt, ApiError> {
    let tokenizer = &ctx.pretrained.tokenizer;
    let vocab = tokenizer.vocab_size().min(ctx.pretrained.config.vocab_size);
    let ids = items
        .iter()
        .map(|item| match item.as_u64() {
            Some(id) if id < vocab as u64 => Ok(id as u32),
            _ => Err(ApiError::invalid(
                Some("prompt"),
                format!("token id {item} is not in the vocabulary (0..{vocab})"),
            )),
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let text = tokenizer
        .decode(&ids, true)
        .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    Ok(Prompt { ids, text })
}

// ---- responses ---------------------------------------------------------------------------------

/// One token's log-prob as it is reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The token's text (special tokens shown).
    pub token: String,
    /// `None` for a completion's echoed first prompt token, which has no context to score it.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position: (text, log-prob), most likely first.
    pub top: Option<Vec<(String, f32)>>,
    /// Where the token's text starts in the choice's text.
    pub offset: usize,
}

/// A piece of a choice's text, with the log-probs of the tokens that produced it: a streamed
/// chunk, or (all of them joined) a whole response's choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub entries: Vec<Entry>,
}

/// One choice, before it is put into either response shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub segments: Vec<Segment>,
    pub finish_reason: &'static str,
    /// Tokens the model generated for this choice (what `usage` counts).
    pub generated_tokens: usize,
}

impl Choice {
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect()
    }
}

/// The text each token adds to the decoded sequence, the way streaming detokenisers work: decode
/// with the previous token as context and keep what the new token added; a token that ends
/// inside a multi-byte character adds nothing until a later token completes it. Decoding tokens
/// one by one instead would lose the spaces SentencePiece tokenizers strip at the start of a
/// text.
pub fn token_pieces(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
    let decode = |span: &[u32]| tok.decode(span, skip_special).unwrap_or_default();
    let mut pieces = Vec::with_capacity(ids.len());
    let (mut context_start, mut emitted_until) = (0usize, 0usize);
    for i in 0..ids.len() {
        let before = decode(&ids[context_start..emitted_until]);
        let after = decode(&ids[context_start..=i]);
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let shared = common_prefix_len(&before, &after);
            pieces.push(after[shared..].to_string());
            context_start = emitted_until;
            emitted_until = i + 1;
        } else {
            pieces.push(String::new());
        }
    }
    pieces
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Start offsets of each token's text in `text`, from the tokens' pieces: running sums, held
/// inside `text` and on character boundaries, so slicing `text` with them never fails.
fn piece_offsets(pieces: &[String], text: &str) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(pieces.len());
    let mut at = 0usize;
    for piece in pieces {
        let mut start = at.min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        offsets.push(start);
        at += piece.len();
    }
    offsets
}

/// A token's text as it reads after `previous`: the two decoded together, less the previous
/// token's text. Alternatives at a position are shown this way, so that the chosen token and the
/// same token among the alternatives read alike (" city", not "city").
fn piece_after(tok: &Tokenizer, previous: Option<u32>, id: u32) -> String {
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
    match previous {
        None => decode(&[id]),
        Some(p) => {
            let before = decode(&[p]);
            let both = decode(&[p, id]);
            both[common_prefix_len(&before, &both)..].to_string()
        }
    }
}

/// The reported entry for a scored token. `shown` is its piece of the text (empty when its text
/// only completes with a later token; then it is shown on its own).
fn entry(
    tok: &Tokenizer,
    shown: &str,
    previous: Option<u32>,
    lp: &TokenLogprob,
    offset: usize,
) -> Entry {
    let token = if shown.is_empty() {
        piece_after(tok, previous, lp.token)
    } else {
        shown.to_string()
    };
    Entry {
        token,
        logprob: Some(lp.logprob),
        top: Some(
            lp.top
                .iter()
                .map(|&(id, l)| (piece_after(tok, previous, id), l))
                .collect(),
        ),
        offset,
    }
}

/// Turn the model's rows into choices: decode, cut at the first stop string (which OpenAI leaves
/// out of the text), split into per-token segments, and attach log-probs.
pub fn choices(
    request: &Request,
    rows: &[RowOutput],
    tok: &Tokenizer,
) -> Result<Vec<Choice>, ApiError> {
    let internal = |e: rlhf_lm::LmError| {
        ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding: {e}"))
    };
    let mut out = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        let prompt = &request.prompts[index / request.n];
        let mut segments = Vec::new();
        let echo = request.echo && request.endpoint == Endpoint::Completions;
        let lps = row.logprobs.as_deref();
        // Scored prompt tokens come first in the row's log-probs.
        let prompt_scored = match request.logprobs {
            Some(LogprobRequest {
                include_prompt: true,
                ..
            }) => prompt.ids.len() - 1,
            _ => 0,
        };
        if echo {
            let mut entries = Vec::new();
            if let Some(lps) = lps {
                let shown = token_pieces(tok, &prompt.ids, false);
                let offsets = piece_offsets(&token_pieces(tok, &prompt.ids, true), &prompt.text);
                for (j, (&id, piece)) in prompt.ids.iter().zip(&shown).enumerate() {
                    entries.push(if j == 0 {
                        Entry {
                            token: if piece.is_empty() {
                                piece_after(tok, None, id)
                            } else {
                                piece.clone()
                            },
                            logprob: None,
                            top: None,
                            offset: offsets[0],
                        }
                    } else {
                        entry(tok, piece, Some(prompt.ids[j - 1]), &lps[j - 1], offsets[j])
                    });
                }
            }
            segments.push(Segment {
                text: prompt.text.clone(),
                entries,
            });
        }
        let base = if echo { prompt.text.len() } else { 0 };

        let full = tok.decode(&row.tokens, true).map_err(internal)?;
        let cut = request
            .params
            .stop_strings
            .iter()
            .filter_map(|s| full.find(s.as_str()))
            .min();
        let text = &full[..cut.unwrap_or(full.len())];
        let offsets = piece_offsets(&token_pieces(tok, &row.tokens, true), text);
        // After a cut, only the tokens whose text starts before it are reported.
        let kept = match cut {
            Some(_) => offsets.iter().filter(|&&o| o < text.len()).count(),
            None => row.tokens.len(),
        };
        // Shown after the prompt's last token, as the alternatives are (see `piece_after`).
        let shown = match lps {
            Some(_) => {
                let mut in_context = vec![prompt.ids[prompt.ids.len() - 1]];
                in_context.extend_from_slice(&row.tokens[..kept]);
                token_pieces(tok, &in_context, false).split_off(1)
            }
            None => Vec::new(),
        };
        for i in 0..kept {
            let end = if i + 1 < kept {
                offsets[i + 1]
            } else {
                text.len()
            };
            let entries = match lps {
                Some(lps) => vec![entry(
                    tok,
                    &shown[i],
                    Some(match i {
                        0 => prompt.ids[prompt.ids.len() - 1],
                        _ => row.tokens[i - 1],
                    }),
                    &lps[prompt_scored + i],
                    base + offsets[i],
                )],
                None => Vec::new(),
            };
            segments.push(Segment {
                text: text[offsets[i]..end].to_string(),
                entries,
            });
        }
        out.push(Choice {
            index,
            segments,
            finish_reason: if cut.is_some() {
                "stop"
            } else {
                finish_reason(row.finish)
            },
            generated_tokens: row.tokens.len(),
        });
    }
    Ok(out)
}

/// What every response and chunk repeats.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

fn usage(request: &Request, choices: &[Choice]) -> Value {
    let prompt_tokens: usize = request.prompts.iter().map(|p| p.ids.len()).sum();
    let completion_tokens: usize = choices.iter().map(|c| c.generated_tokens).sum();
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Chat log-probs: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
fn chat_logprobs(entries: &[&Entry]) -> Value {
    let item = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(&e.token, e.logprob.unwrap_or(0.0));
            v["top_logprobs"] = e.top.iter().flatten().map(|(t, l)| item(t, *l)).collect();
            v
        })
        .collect();
    json!({ "content": content })
}

/// Legacy completions log-probs: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a
/// token -> log-prob map per position, the chosen token always in it, as vLLM reports) and
/// `text_offset`. The echoed first prompt token has `null` log-prob and alternatives.
fn completion_logprobs(entries: &[&Entry]) -> Value {
    let top: Vec<Value> = entries
        .iter()
        .map(|e| match (&e.top, e.logprob) {
            (Some(top), Some(lp)) => {
                let mut map = Map::new();
                for (t, l) in top {
                    map.entry(t.clone()).or_insert(json!(l));
                }
                map.entry(e.token.clone()).or_insert(json!(lp));
                Value::Object(map)
            }
            _ => Value::Null,
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
    })
}

fn logprobs_value(endpoint: Endpoint, entries: &[&Entry]) -> Value {
    match endpoint {
        Endpoint::Chat => chat_logprobs(entries),
        Endpoint::Completions => completion_logprobs(entries),
    }
}

/// The whole (non-streamed) response body.
pub fn response_body(request: &Request, choices: &[Choice], meta: &Meta) -> Value {
    let with_logprobs = request.logprobs.is_some();
    let choice_values: Vec<Value> = choices
        .iter()
        .map(|c| {
            let entries: Vec<&Entry> = c.segments.iter().flat_map(|s| &s.entries).collect();
            let logprobs = if with_logprobs {
                logprobs_value(request.endpoint, &entries)
            } else {
                Value::Null
            };
            match request.endpoint {
                Endpoint::Chat => json!({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text()},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }),
                Endpoint::Completions => json!({
                    "index": c.index,
                    "text": c.text(),
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }),
            }
        })
        .collect();
    json!({
        "id": meta.id,
        "object": match request.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        },
        "created": meta.created,
        "model": meta.model,
        "choices": choice_values,
        "usage": usage(request, choices),
    })
}

/// The streamed response: server-sent events, one `data: {chunk}` per segment of each choice (a
/// chat stream opens each choice with its role), a last chunk per choice with its finish reason,
/// the usage when asked, then `data: [DONE]`.
/// One streamed chunk object holding `choices`.
fn chunk_value(request: &Request, meta: &Meta, choices: Value) -> Value {
    json!({
        "id": meta.id,
        "object": match request.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    })
}

/// A streamed chunk of one choice: new text, its log-probs, and/or the finish reason.
pub fn choice_event(
    request: &Request,
    meta: &Meta,
    index: usize,
    text: Option<&str>,
    logprobs: Value,
    finish: Option<&str>,
) -> Value {
    let choice = match request.endpoint {
        Endpoint::Chat => json!({
            "index": index,
            "delta": match text { Some(t) => json!({"content": t}), None => json!({}) },
            "logprobs": logprobs,
            "finish_reason": finish,
        }),
        Endpoint::Completions => json!({
            "index": index,
            "text": text.unwrap_or(""),
            "logprobs": logprobs,
            "finish_reason": finish,
        }),
    };
    chunk_value(request, meta, json!([choice]))
}

/// The chat stream's first chunk of a choice: the assistant role, no text yet.
pub fn role_event(request: &Request, meta: &Meta, index: usize) -> Value {
    chunk_value(
        request,
        meta,
        json!([{
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }]),
    )
}

pub fn stream_events(request: &Request, choices: &[Choice], meta: &Meta) -> Vec<String> {
    let with_logprobs = request.logprobs.is_some();
    let chunk = |choices: Value| chunk_value(request, meta, choices);
    let choice_chunk = |index: usize, text: Option<&str>, logprobs: Value, finish: Option<&str>| {
        choice_event(request, meta, index, text, logprobs, finish)
    };
    let mut events = Vec::new();
    for c in choices {
        if request.endpoint == Endpoint::Chat {
            events.push(role_event(request, meta, c.index));
        }
        for s in &c.segments {
            if s.text.is_empty() && s.entries.is_empty() {
                continue;
            }
            let logprobs = if with_logprobs {
                logprobs_value(request.endpoint, &s.entries.iter().collect::<Vec<_>>())
            } else {
                Value::Null
            };
            events.push(choice_chunk(c.index, Some(&s.text), logprobs, None));
        }
        events.push(choice_chunk(
            c.index,
            None,
            Value::Null,
            Some(c.finish_reason),
        ));
    }
    let mut lines: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    if request.include_usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage(request, choices);
        lines.push(format!("data: {last}\n\n"));
    }
    lines.push("data: [DONE]\n\n".to_string());
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_stops_at_a_character_boundary() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
        assert_eq!(common_prefix_len("aé", "aè"), 1);
    }

    #[test]
    fn offsets_stay_inside_the_text_on_boundaries() {
        let pieces: Vec<String> = ["a", "é", "bc", "zz"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // The text was cut inside the third piece.
        assert_eq!(piece_offsets(&pieces, "aéb"), vec![0, 1, 3, 4]);
        assert_eq!(piece_offsets(&pieces, "a"), vec![0, 1, 1, 1]);
    }
}
