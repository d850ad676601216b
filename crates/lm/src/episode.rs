//! Episodes: a token sequence cut into spans that each belong to one speaker, so one scoring pass
//! serves single-turn completions and multi-turn conversations alike.
//!
//! A single-turn row is the two-span case `[Prompt, Assistant]`; a dialogue is
//! `[Prompt, Assistant, User, Assistant, ...]`. Scoring is teacher-forced over the flattened ids,
//! and the roles say which predicted tokens a loss may touch: policy-gradient losses use the
//! assistant tokens, a user-modelling NLL the user tokens, and the prompt is context only.

use crate::error::{LmError, Result};

/// Who produced a span's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Context that is never trained on: system text and the opening prompt (with BOS).
    Prompt,
    /// Tokens the policy produced (or is taught to produce).
    Assistant,
    /// Later user turns in a conversation.
    User,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub role: Role,
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Episode {
    pub spans: Vec<Span>,
}

impl Episode {
    /// The single-turn case: one prompt span and one assistant completion.
    pub fn single_turn(prompt: Vec<u32>, completion: Vec<u32>) -> Self {
        Episode::default()
            .with(Role::Prompt, prompt)
            .with(Role::Assistant, completion)
    }

    /// This episode with one more span at the end.
    pub fn with(mut self, role: Role, ids: Vec<u32>) -> Self {
        self.spans.push(Span { role, ids });
        self
    }

    /// Number of tokens over all spans.
    pub fn len(&self) -> usize {
        self.spans.iter().map(|s| s.ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flattened token ids, span after span.
    pub fn ids(&self) -> Vec<u32> {
        self.spans
            .iter()
            .flat_map(|s| s.ids.iter().copied())
            .collect()
    }

    /// The role of every target, aligned with `next_token_logprobs`: entry j is the role of token
    /// j + 1, the token predicted at index j. Length `len() - 1` (empty for an empty episode).
    pub fn target_roles(&self) -> Vec<Role> {
        self.spans
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.role, s.ids.len()))
            .skip(1)
            .collect()
    }

    /// 1.0 where the target at index j has `role`, else 0.0; length `len() - 1`.
    pub fn target_mask(&self, role: Role) -> Vec<f32> {
        self.target_roles()
            .into_iter()
            .map(|r| if r == role { 1.0 } else { 0.0 })
            .collect()
    }

    /// An episode must open with a prompt token: the first token has no context to be scored
    /// against, so it cannot be an assistant or user token that a loss expects to see.
    pub fn validate(&self) -> Result<()> {
        match self.spans.iter().find(|s| !s.ids.is_empty()) {
            None => Err(LmError::Invalid("empty episode".into())),
            Some(s) if s.role != Role::Prompt => Err(LmError::Invalid(format!(
                "episode opens with a {:?} token; it must open with a non-empty Prompt span",
                s.role
            ))),
            Some(_) => Ok(()),
        }
    }
}
