//! ipcluster's sk_lookup program (the sk-lookup backend): a separate object,
//! so that a cluster steered this way does not create the tc backend's flow
//! table.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod table;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
