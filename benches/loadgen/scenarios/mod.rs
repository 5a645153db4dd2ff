//! The scenarios, one file each; `main` runs the one named on the command
//! line. Each `run` reads its own flags from the context, drives the target
//! and returns what it found as an `Outcome` (the figures of the JSON result).

pub mod fanout;
pub mod idle;
pub mod joinstorm;
pub mod login;
pub mod many;
pub mod rest;
