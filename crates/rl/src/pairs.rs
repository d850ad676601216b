//! Training data as token ids: prompt/completion rows and preference pairs, tokenised TRL's way
//! (prompt with special tokens, completion without, ended at its first EOS or given one) and cut
//! to `max_len`; a pair's two completions share one prompt and are cut together.

use rlhf_data::loaders::{load_pairs, load_prompt_completion, LoadOptions, Loaded};
use rlhf_train::{Result, TrainError};

use crate::policy::TrainableLm;

/// The loaded items, after saying how many bad lines were skipped; an error naming the file when
/// nothing is left.
fn checked<T>(path: &std::path::Path, loaded: Loaded<T>, empty: &str) -> Result<Vec<T>> {
    if !loaded.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} bad lines",
            path.display(),
            loaded.skipped.len()
        );
    }
    if loaded.items.is_empty() {
        return Err(TrainError::bad_file(path, empty));
    }
    Ok(loaded.items)
}

/// Tokenised (prompt, completion + EOS) rows from a data file.
pub fn load_rows(
    lm: &TrainableLm,
    path: &std::path::Path,
    max_len: usize,
    skip_bad_lines: bool,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let loaded = load_prompt_completion(
        path,
        lm.chat_template.as_ref(),
        &LoadOptions { skip_bad_lines },
    )?;
    let items = checked(path, loaded, "no examples")?;
    Ok(items
        .iter()
        .map(|ex| lm.encode(&ex.prompt, &ex.completion, true, max_len))
        .collect::<rlhf_lm::Result<_>>()?)
}

#[derive(Debug, Clone)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: f64,
}

pub fn load_pair_ids(
    lm: &TrainableLm,
    path: &std::path::Path,
    max_len: usize,
    skip: bool,
) -> Result<Vec<PairIds>> {
    let loaded = load_pairs(
        path,
        lm.chat_template.as_ref(),
        &LoadOptions {
            skip_bad_lines: skip,
        },
    )?;
    checked(path, loaded, "no preference pairs")?
        .iter()
        .map(|p| {
            let (prompt, chosen, rejected) =
                lm.encode_shared(&p.prompt, &p.chosen, &p.rejected, true, max_len)?;
            Ok(PairIds {
                prompt,
                chosen,
                rejected,
                margin: p.margin.unwrap_or(0.0),
            })
        })
        .collect()
}
