//! dispactl's library half: a small typed client for the plane's Admin API (reused by the
//! end-to-end tests) and the rendering of its answers.

pub mod client;
pub mod output;
