//! ipcluster's tc programs: sticky source-IP steering of TCP connections to
//! worker ports (ingress) and the reverse rewrite of replies (egress).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod steer;
#[cfg(target_arch = "bpf")]
mod table;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
