//! Training infrastructure shared by every method.
