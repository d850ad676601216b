//! Conversations as token episodes, through the model's own chat template.
//!
//! A multi-turn conversation is seen from two sides. The **assistant view** is the conversation
//! itself (`messages`, opening with the first user message or a system message); the **user view**
//! is the same turns after a private `user_context` (what only the user knows: the hidden item of a
//! guessing game, a persona), placed first as a system message. One model can learn both: the
//! policy on assistant tokens of the assistant view, the user model on user tokens of the user
//! view.
//!
//! Each message becomes three token pieces: the template's **header** before the content
//! (`<|im_start|>assistant\n`, `assistant :`), the **emitted** tokens the speaker produces (content
//! and the template's end-of-turn token, which must be an EOS id so generation stops there), and
//! the template's **trailer** after that token (ChatML's newline). Header and trailer are context
//! (role `Prompt`); the emitted tokens carry the speaker's role. The pieces come from rendering the
//! history with and without one more message whose content is a sentinel, so any chat template that
//! renders a conversation as a prefix of its continuation works; one that does not is refused with
//! an error. Pieces are tokenised separately (the first with BOS): sampled tokens are kept as
//! sampled, and training data is encoded the same way, so rollouts and training see the same ids.

use rlhf_lm::episode::{Episode, Role};
use rlhf_lm::{ChatTemplate, LmError, Message, Result, Tokenizer};
use serde::{Deserialize, Serialize};

/// Stands in for a message's content while the template is rendered.
const SENTINEL: &str = "\u{1}\u{2}content\u{2}\u{1}";

/// A conversation and what only its user knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialogue {
    /// The user's private context (system message of the user view); `None`: the user view is the
    /// assistant view.
    pub user_context: Option<String>,
    /// The conversation as the assistant sees it (`system`, `user`, `assistant` roles).
    pub messages: Vec<Message>,
}

/// Which side of a conversation is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Assistant,
    User,
}

/// One message's tokens: `header` (context), `emitted` (the speaker's tokens, ending at EOS when
/// the turn ended), `trailer` (context).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TurnTokens {
    pub header: Vec<u32>,
    pub emitted: Vec<u32>,
    pub trailer: Vec<u32>,
}

/// Renders conversations into token pieces with a chat template and tokenizer.
pub struct Renderer<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    pub eos_ids: &'a [u32],
}

impl<'a> Renderer<'a> {
    pub fn new(template: &'a ChatTemplate, tokenizer: &'a Tokenizer, eos_ids: &'a [u32]) -> Self {
        Renderer {
            template,
            tokenizer,
            eos_ids,
        }
    }

    /// The template text around a new message of `role` after `history`: (header, footer).
    fn frame(&self, history: &[Message], role: &str) -> Result<(String, String)> {
        let before = if history.is_empty() {
            String::new()
        } else {
            self.template.render(history, false)?
        };
        let mut extended = history.to_vec();
        extended.push(Message::new(role, SENTINEL));
        let after = self.template.render(&extended, false)?;
        let rest = after.strip_prefix(before.as_str()).ok_or_else(|| {
            LmError::Invalid(format!(
                "the chat template renders {} message(s) differently once a `{role}` message follows; multi-turn rollouts need a template whose rendering of a conversation is a prefix of its continuation",
                history.len()
            ))
        })?;
        let (header, footer) = rest.split_once(SENTINEL).ok_or_else(|| {
            LmError::Invalid(format!(
                "the chat template does not print a `{role}` message's content verbatim"
            ))
        })?;
        Ok((header.to_string(), footer.to_string()))
    }

    /// The context tokens that open a new message of `role` after `history` (the generation
    /// prompt of that speaker's next turn); BOS first when `history` is empty.
    pub fn header(&self, history: &[Message], role: &str) -> Result<Vec<u32>> {
        let (header, _) = self.frame(history, role)?;
        self.tokenizer.encode(&header, history.is_empty())
    }

    /// The tokens of `history`'s next message `message`. `emitted`: the tokens the speaker
    /// actually produced (a sampled turn), used as they are; otherwise the content is encoded and
    /// the template's end-of-turn tokens (up to and including the first EOS) appended.
    pub fn turn(
        &self,
        history: &[Message],
        message: &Message,
        emitted: Option<&[u32]>,
    ) -> Result<TurnTokens> {
        let (header, footer) = self.frame(history, &message.role)?;
        let footer_ids = self.tokenizer.encode(&footer, false)?;
        let end = footer_ids
            .iter()
            .position(|t| self.eos_ids.contains(t))
            .ok_or_else(|| {
                LmError::Invalid(format!(
                    "the chat template ends a `{}` message with {footer:?}, which holds no EOS token: a turn must end with one so that generation stops there",
                    message.role
                ))
            })?;
        let emitted = match emitted {
            Some(ids) => ids.to_vec(),
            None => {
                let mut ids = self.tokenizer.encode(&message.content, false)?;
                ids.extend_from_slice(&footer_ids[..=end]);
                ids
            }
        };
        Ok(TurnTokens {
            header: self.tokenizer.encode(&header, history.is_empty())?,
            emitted,
            trailer: footer_ids[end + 1..].to_vec(),
        })
    }

    /// The messages of one view: the user view puts `user_context` first as a system message.
    pub fn view_messages(dialogue: &Dialogue, view: View) -> Vec<Message> {
        match (view, &dialogue.user_context) {
            (View::User, Some(ctx)) => std::iter::once(Message::new("system", ctx.clone()))
                .chain(dialogue.messages.iter().cloned())
                .collect(),
            _ => dialogue.messages.clone(),
        }
    }

    /// Every message of one view as token pieces; `emitted[i]` (when given) holds the sampled
    /// tokens of `dialogue.messages[i]`.
    pub fn turns(
        &self,
        dialogue: &Dialogue,
        view: View,
        emitted: &[Option<Vec<u32>>],
    ) -> Result<Vec<TurnTokens>> {
        let messages = Self::view_messages(dialogue, view);
        let offset = messages.len() - dialogue.messages.len();
        (0..messages.len())
            .map(|i| {
                let sampled = i
                    .checked_sub(offset)
                    .and_then(|j| emitted.get(j))
                    .and_then(|e| e.as_deref());
                self.turn(&messages[..i], &messages[i], sampled)
            })
            .collect()
    }
}

/// The role of a message's emitted tokens: `user` → User, `assistant` → Assistant, anything else
/// (system, tool) → context.
pub fn speaker_role(message_role: &str) -> Role {
    match message_role {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        _ => Role::Prompt,
    }
}

/// An episode from token pieces: header and trailer as context, emitted tokens with `role_of(i)`.
pub fn episode(turns: &[TurnTokens], role_of: impl Fn(usize) -> Role) -> Episode {
    let mut e = Episode::default();
    for (i, t) in turns.iter().enumerate() {
        for (role, ids) in [
            (Role::Prompt, &t.header),
            (role_of(i), &t.emitted),
            (Role::Prompt, &t.trailer),
        ] {
            if ids.is_empty() {
                continue;
            }
            // Merge with the previous span when the role continues (fewer, longer spans).
            match e.spans.last_mut() {
                Some(last) if last.role == role => last.ids.extend_from_slice(ids),
                _ => e = e.with(role, ids.clone()),
            }
        }
    }
    e
}

/// The flat ids of token pieces plus a generation header: the prompt of the next turn.
pub fn prompt_ids(turns: &[TurnTokens], header: &[u32]) -> Vec<u32> {
    let mut ids: Vec<u32> = turns
        .iter()
        .flat_map(|t| t.header.iter().chain(&t.emitted).chain(&t.trailer).copied())
        .collect();
    ids.extend_from_slice(header);
    ids
}

/// The text a whole-dialogue scorer (reward model, command, HTTP) reads: the rendered opening
/// (messages up to and including the first user message) as the prompt and the rendered rest as
/// the completion, so `prompt + completion` is the whole rendered conversation.
pub fn transcript(template: &ChatTemplate, messages: &[Message]) -> Result<(String, String)> {
    let first_user = messages.iter().position(|m| m.role == "user").unwrap_or(0);
    let prompt = template.render(&messages[..=first_user.min(messages.len() - 1)], false)?;
    let all = template.render(messages, false)?;
    let completion = all.strip_prefix(prompt.as_str()).ok_or_else(|| {
        LmError::Invalid("the chat template's rendering is not prefix-stable".into())
    })?;
    Ok((prompt, completion.to_string()))
}

/// Conversations from JSONL: TRL's conversational `messages` per line, and an optional
/// `user_context` string (what only the user knows). A line without messages, with an empty list,
/// or with a `user_context` that is not a string is an error naming the file, line and field.
pub fn load_dialogues(path: &std::path::Path) -> rlhf_train::Result<Vec<Dialogue>> {
    let lines = rlhf_data::jsonl::read(path)?;
    let mut out = Vec::with_capacity(lines.len());
    for line in &lines {
        let messages = line.messages("messages")?;
        if messages.is_empty() {
            return Err(LmError::BadLine {
                path: line.path.clone(),
                line: line.line,
                field: "messages".into(),
                message: "an empty conversation".into(),
            }
            .into());
        }
        let user_context = if line.has("user_context") {
            Some(line.string("user_context")?)
        } else {
            None
        };
        out.push(Dialogue {
            user_context,
            messages,
        });
    }
    if out.is_empty() {
        return Err(rlhf_train::TrainError::invalid(format!(
            "{}: no conversations",
            path.display()
        )));
    }
    Ok(out)
}

/// Write conversations in the format [`load_dialogues`] reads (atomically).
pub fn write_dialogues(path: &std::path::Path, dialogues: &[Dialogue]) -> rlhf_train::Result<()> {
    rlhf_train::run::write_jsonl(path, dialogues)
}

/// One view of a dialogue as a supervised episode: every message's tokens with its speaker's role
/// (the user view's `user_context` and every template token are context).
pub fn view_episode(renderer: &Renderer, dialogue: &Dialogue, view: View) -> Result<Episode> {
    let messages = Renderer::view_messages(dialogue, view);
    let turns = renderer.turns(dialogue, view, &[])?;
    Ok(episode(&turns, |i| speaker_role(&messages[i].role)))
}

/// The role a view trains: assistant tokens in the assistant view, user tokens in the user view.
pub fn view_role(view: View) -> Role {
    match view {
        View::Assistant => Role::Assistant,
        View::User => Role::User,
    }
}
