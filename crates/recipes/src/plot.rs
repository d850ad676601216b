//! The SVG charts of the comparison reports: the train crate's chart module, re-exported here so
//! that the reports and the run directories draw with the same code.

pub use rlhf_train::plot::*;
