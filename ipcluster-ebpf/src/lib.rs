//! The tc classifiers live in `main.rs` (the binary aya-build compiles for
//! `bpfel-unknown-none`). This empty library exists so that the user-side crate
//! can name this package as a build dependency, which makes cargo rebuild the
//! embedded object when it changes.
#![no_std]
