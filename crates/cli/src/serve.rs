//! `rlhf serve`: an OpenAI-compatible HTTP server over one model.
//!
//! `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`
//! (with `echo` and `logprobs`, which is what lm-evaluation-harness's `local-completions` reads
//! for log-likelihood tasks), plus `GET /stats` with batching counters. The HTTP side (axum on a
//! tokio runtime) checks and tokenises requests; the model runs on one worker thread that batches
//! concurrent requests ([`engine`]); [`openai`] holds the wire format.
//!
//! Streaming sends the finished completion as per-token chunks: the generation loop has no
//! per-token callback, so the first chunk arrives when the whole completion is done.

mod engine;
mod openai;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::Device;
use clap::Args;
use rlhf_lm::Pretrained;
use rlhf_rl::reward::RewardModel;
use serde_json::json;
use tokio::sync::oneshot;

use engine::{Engine, Job, SubmitError};
use openai::{ApiError, Endpoint, Meta, ModelContext};

#[derive(Args)]
pub struct ServeArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the bound address is printed on the first line).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name clients use in `model` (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most waiting requests decoded together in one batched generation (also the most rows in
    /// one generate call).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Most requests waiting for the model; more are refused with 503.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body; larger ones are refused with 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
}

/// What every handler shares.
struct App {
    ctx: ModelContext,
    engine: Engine,
    /// A reward model's trunk and head (the model has `score.weight`), for `/v1/rewards`.
    rewards: Option<Arc<RewardModel>>,
    /// For response ids: distinct within a run.
    next_id: AtomicU64,
    /// When the server started (the model's `created` in `/v1/models`).
    started: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn serve(a: ServeArgs, device: &Device) -> Result<()> {
    let pretrained = Arc::new(Pretrained::load(&a.model, device)?);
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| a.model.display().to_string());
    let context_length = pretrained.config.max_position_embeddings;
    let engine = Engine::start(pretrained.clone(), device.clone(), a.max_batch, a.max_queue)?;
    let rewards = match pretrained.weights.contains_key(rlhf_rl::reward::HEAD) {
        true => Some(Arc::new(RewardModel::from_pretrained(&pretrained, device)?)),
        false => None,
    };
    let app = Arc::new(App {
        rewards,
        ctx: ModelContext {
            name,
            pretrained,
            context_length,
            max_tokens_limit: a.max_tokens_limit,
        },
        engine,
        next_id: AtomicU64::new(0),
        started: unix_now(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .thread_name("rlhf-serve-http")
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let address = listener.local_addr()?;
        // The first line of standard output, for scripts and tests started with --port 0.
        println!("listening on http://{address}");
        std::io::stdout().flush()?;
        eprintln!(
            "serving {} as {:?} (context {} tokens, batches of up to {}, queue {})",
            app.ctx.pretrained.source.display(),
            app.ctx.name,
            app.ctx.context_length,
            a.max_batch,
            a.max_queue
        );
        axum::serve(listener, router(app, a.max_body_bytes))
            .await
            .context("serving HTTP")
    })
}

fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/stats", get(stats))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/rewards", post(rewards))
        .fallback(|| async {
            ApiError::invalid(None, "no such endpoint")
                .with_status(StatusCode::NOT_FOUND)
                .with_code("not_found")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::invalid(None, "this endpoint does not take that method")
                .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.ctx.name,
            "object": "model",
            "created": app.started,
            "owned_by": "rlhf",
            "max_model_len": app.ctx.context_length,
        }],
    }))
}

async fn stats(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let s = &app.engine.stats;
    Json(json!({
        "jobs_done": s.jobs.load(Ordering::Relaxed),
        "generate_calls": s.generate_calls.load(Ordering::Relaxed),
        "largest_shared_batch": s.largest_shared_batch.load(Ordering::Relaxed),
        "queued": s.queued.load(Ordering::Relaxed),
    }))
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(app, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(app, body, Endpoint::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Check the request, queue it for the model, and shape what comes back.
async fn answer(
    app: Arc<App>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let error = ApiError::invalid(None, rejection.body_text()).with_status(status);
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error.with_code("request_too_large")
        } else {
            error
        }
    })?;
    let request = match endpoint {
        Endpoint::Chat => openai::parse_chat(&body, &app.ctx)?,
        Endpoint::Completions => openai::parse_completion(&body, &app.ctx)?,
    };
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let meta = Meta {
        id: format!(
            "{prefix}-{:x}{:06x}",
            app.started,
            app.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_now(),
        model: app.ctx.name.clone(),
    };
    // One streamed completion of plain text is sent token by token as it is sampled; several
    // choices, stop strings, log-probs or echo are streamed once the completion is done.
    let incremental = request.stream
        && request.n == 1
        && request.prompts.len() == 1
        && request.logprobs.is_none()
        && request.params.stop_strings.is_empty()
        && !request.echo;
    let (progress, tokens) = match incremental {
        true => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let (reply, rows) = oneshot::channel();
    app.engine
        .submit(Job {
            rows: request.rows(),
            params: request.params.clone(),
            sharing: request.sharing,
            logprobs: request.logprobs,
            reply,
            progress,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull => ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy: its request queue is full (--max-queue); retry later",
            )
            .with_code("queue_full"),
            SubmitError::Stopped => {
                ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "the model worker stopped")
            }
        })?;
    if let Some(tokens) = tokens {
        return Ok(event_stream(Body::from_stream(live_events(
            app, request, meta, tokens, rows,
        ))));
    }
    let rows = rows
        .await
        .map_err(|_| {
            ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model worker dropped the request",
            )
        })?
        .map_err(|message| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, message))?;
    let choices = openai::choices(&request, &rows, &app.ctx.pretrained.tokenizer)?;
    if request.stream {
        let events = openai::stream_events(&request, &choices, &meta);
        Ok(event_stream(Body::from_stream(futures_util::stream::iter(
            events.into_iter().map(Ok::<_, std::convert::Infallible>),
        ))))
    } else {
        Ok(Json(openai::response_body(&request, &choices, &meta)).into_response())
    }
}

fn event_stream(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Server-sent events of one completion as the worker samples it: the role (chat), then the
/// text each new token adds (decoded with the tokens before it; a token that ends inside a
/// character waits for the next one), then, once the worker answers, whatever text the finished
/// completion has beyond what was sent, the finish reason, usage when asked and `[DONE]`. The
/// text sent adds up to the non-streamed answer's.
fn live_events(
    app: Arc<App>,
    request: openai::Request,
    meta: Meta,
    tokens: tokio::sync::mpsc::UnboundedReceiver<u32>,
    reply: oneshot::Receiver<Result<Vec<engine::RowOutput>, String>>,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    struct Live {
        app: Arc<App>,
        request: openai::Request,
        meta: Meta,
        tokens: tokio::sync::mpsc::UnboundedReceiver<u32>,
        reply: Option<oneshot::Receiver<Result<Vec<engine::RowOutput>, String>>>,
        ids: Vec<u32>,
        sent: String,
        started: bool,
    }
    let event = |v: serde_json::Value| format!("data: {v}\n\n");
    let state = Live {
        app,
        request,
        meta,
        tokens,
        reply: Some(reply),
        ids: Vec::new(),
        sent: String::new(),
        started: false,
    };
    futures_util::stream::unfold(state, move |mut st| async move {
        if !st.started {
            st.started = true;
            let first = match st.request.endpoint {
                Endpoint::Chat => event(openai::role_event(&st.request, &st.meta, 0)),
                Endpoint::Completions => String::new(),
            };
            return Some((Ok(first), st));
        }
        let tokenizer = &st.app.ctx.pretrained.tokenizer;
        if let Some(token) = st.tokens.recv().await {
            st.ids.push(token);
            let text = tokenizer.decode(&st.ids, true).unwrap_or_default();
            let out = match text.strip_prefix(st.sent.as_str()) {
                Some(new) if !new.is_empty() && !new.ends_with('\u{FFFD}') => {
                    let new = new.to_string();
                    st.sent = text;
                    event(openai::choice_event(
                        &st.request,
                        &st.meta,
                        0,
                        Some(&new),
                        serde_json::Value::Null,
                        None,
                    ))
                }
                _ => String::new(),
            };
            return Some((Ok(out), st));
        }
        // The worker has sent every token: its answer closes the stream.
        let reply = st.reply.take()?;
        let rows = match reply.await {
            Ok(Ok(rows)) => rows,
            Ok(Err(message)) => return Some((Ok(stream_error(&message)), st)),
            Err(_) => return Some((Ok(stream_error("the model worker dropped the request")), st)),
        };
        let choices = match openai::choices(&st.request, &rows, tokenizer) {
            Ok(c) => c,
            Err(_) => return Some((Ok(stream_error("could not shape the answer")), st)),
        };
        let full = choices.first().map(|c| c.text()).unwrap_or_default();
        let mut out = String::new();
        if let Some(rest) = full
            .strip_prefix(st.sent.as_str())
            .filter(|r| !r.is_empty())
        {
            out.push_str(&event(openai::choice_event(
                &st.request,
                &st.meta,
                0,
                Some(rest),
                serde_json::Value::Null,
                None,
            )));
        }
        // The finished stream's closing events: finish reason, usage when asked, [DONE].
        let closing = openai::stream_events(&st.request, &choices, &st.meta);
        let tail = 2 + st.request.include_usage as usize;
        out.push_str(&closing[closing.len().saturating_sub(tail)..].concat());
        Some((Ok(out), st))
    })
}

/// `POST /v1/rewards` with `{"prompts": [...], "completions": [...]}`: `{"scores": [...]}`, the
/// served reward model's raw scores, as `reward.source = "http"` (and `"command"`) ask for them.
/// Texts are tokenised as a reward model of another tokenizer reads them in a run (the prompt
/// with special tokens, the completion without, then EOS), so a run pointed here gets the scores
/// it would get from the model in process.
async fn rewards(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    score_texts(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn score_texts(
    app: Arc<App>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::invalid(None, r.body_text()).with_status(r.status()))?;
    let Some(rm) = app.rewards.clone() else {
        return Err(ApiError::invalid(
            None,
            "this model has no reward head (`score.weight`): serve a reward model for /v1/rewards",
        )
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_a_reward_model"));
    };
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not JSON: {e}")))?;
    let texts = |field: &str| -> Result<Vec<String>, ApiError> {
        v.get(field)
            .and_then(|x| x.as_array())
            .ok_or_else(|| {
                ApiError::invalid(Some(field), format!("`{field}` must be a list of strings"))
            })?
            .iter()
            .map(|x| {
                x.as_str().map(String::from).ok_or_else(|| {
                    ApiError::invalid(Some(field), format!("`{field}` must be a list of strings"))
                })
            })
            .collect()
    };
    let (prompts, completions) = (texts("prompts")?, texts("completions")?);
    if prompts.len() != completions.len() {
        return Err(ApiError::invalid(
            Some("completions"),
            format!(
                "{} prompts but {} completions",
                prompts.len(),
                completions.len()
            ),
        ));
    }
    let scored = tokio::task::spawn_blocking(move || -> Result<Vec<f64>, String> {
        let rows = prompts
            .iter()
            .zip(&completions)
            .map(|(p, c)| {
                let (p, mut c) = rlhf_lm::score::encode_pair(&rm.tokenizer, p, c)?;
                if let Some(eos) = rm.tokenizer.eos_token_id() {
                    c.push(eos);
                }
                Ok((p, c))
            })
            .collect::<rlhf_lm::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        rm.score_raw(&rows, 16).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError::invalid(None, e))?;
    Ok(Json(json!({"scores": scored})).into_response())
}

/// An error inside a stream that has already started: an error event, then `[DONE]`.
fn stream_error(message: &str) -> String {
    let v = json!({"error": {"message": message, "type": "server_error"}});
    format!("data: {v}\n\ndata: [DONE]\n\n")
}
