//! The one rule for cluster names (`--name`), checked by the command line and
//! again by every steering backend before a name reaches the file system or
//! the kernel.
//!
//! A name is 1 to 64 ASCII letters, digits, `-` or `_`, not starting with `-`.
//! It has to fit every place it goes:
//!
//! - the state directory `/run/ipcluster/<name>/` and the pin folder
//!   `/sys/fs/bpf/ipcluster/<name>/`: one path component, so no `/`, and never
//!   `.` or `..`; bpffs refuses names with a dot, and `~` marks the backends'
//!   temporary pin folders (`~tmp~<pid>~<name>`), so neither is allowed;
//! - the control socket `/run/ipcluster/<name>/control.sock`: a Unix socket
//!   path holds at most 107 bytes, 92 with a 64-byte name;
//! - the iptables chain `IPCLUSTER-<name>`, which iptables limits to 28
//!   characters: names up to 18 characters are used as they are, longer ones
//!   are shortened to their first 9 characters and a hash of the whole name
//!   (`steering::iptables::chain_name`), and the name itself goes into each
//!   rule's comment, so no `:` or quote;
//! - command lines and logs: a leading `-` would read as a flag.
//!
//! These were the names the command line accepted before this module
//! existed, and every backend accepted them too; the backends' own checks
//! (which allowed `.` for iptables, or anything but `/`, `.` and `~` for the
//! pin folder) are replaced by this one.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// The rule, as error messages state it.
pub const RULE: &str =
    "a cluster name is 1 to 64 ASCII letters, digits, '-' or '_', not starting with '-'";

/// A cluster name that passed [`ClusterName::new`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName(String);

/// What is wrong with a cluster name; the message names the value and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster name {name:?}: {problem}; {RULE}")]
pub struct ClusterNameError {
    pub name: String,
    pub problem: NameProblem,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {0} bytes long")]
    TooLong(usize),
    #[error("{0:?} is not allowed")]
    Character(char),
    #[error("it starts with '-'")]
    LeadingDash,
}

impl ClusterName {
    /// The longest name, in bytes (all of them ASCII).
    pub const MAX_LEN: usize = 64;

    /// Check `name` against the rule.
    pub fn new(name: &str) -> Result<Self, ClusterNameError> {
        let problem = if name.is_empty() {
            Some(NameProblem::Empty)
        } else if let Some(c) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            Some(NameProblem::Character(c))
        } else if name.len() > Self::MAX_LEN {
            Some(NameProblem::TooLong(name.len()))
        } else if name.starts_with('-') {
            Some(NameProblem::LeadingDash)
        } else {
            None
        };
        match problem {
            None => Ok(ClusterName(name.to_owned())),
            Some(problem) => Err(ClusterNameError {
                name: name.to_owned(),
                problem,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for ClusterName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = ClusterNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(name: ClusterName) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steering::iptables::chain_name;
    use crate::steering::iptables::rules::MAX_CHAIN_NAME;

    fn problem(name: &str) -> NameProblem {
        ClusterName::new(name).expect_err(name).problem
    }

    #[test]
    fn edge_cases() {
        let max = "a".repeat(ClusterName::MAX_LEN);
        for good in ["default", "a", "_", "_x", "a-b_c", "A9", "x-", max.as_str()] {
            assert_eq!(
                ClusterName::new(good).map(String::from),
                Ok(good.to_owned())
            );
        }
        assert_eq!(problem(""), NameProblem::Empty);
        assert_eq!(problem("-a"), NameProblem::LeadingDash);
        assert_eq!(problem("-"), NameProblem::LeadingDash);
        assert_eq!(problem("a/b"), NameProblem::Character('/'));
        assert_eq!(problem("/"), NameProblem::Character('/'));
        assert_eq!(problem("."), NameProblem::Character('.'));
        assert_eq!(problem(".."), NameProblem::Character('.'));
        assert_eq!(problem("a.b"), NameProblem::Character('.'));
        assert_eq!(problem("~tmp"), NameProblem::Character('~'));
        assert_eq!(problem("a b"), NameProblem::Character(' '));
        assert_eq!(problem("a:b"), NameProblem::Character(':'));
        assert_eq!(problem("a\"b"), NameProblem::Character('"'));
        assert_eq!(problem("a\0"), NameProblem::Character('\0'));
        assert_eq!(problem("café"), NameProblem::Character('é'));
        let long = "a".repeat(ClusterName::MAX_LEN + 1);
        assert_eq!(problem(&long), NameProblem::TooLong(65));
    }

    #[test]
    fn the_error_names_the_value_and_the_rule() {
        let e = ClusterName::new("a/b").expect_err("slash").to_string();
        assert_eq!(
            e,
            "invalid cluster name \"a/b\": '/' is not allowed; a cluster name is 1 to 64 ASCII \
             letters, digits, '-' or '_', not starting with '-'"
        );
        let e = ClusterName::new("").expect_err("empty").to_string();
        assert!(
            e.starts_with("invalid cluster name \"\": it is empty; "),
            "{e}"
        );
        let e = ClusterName::new(&"b".repeat(65))
            .expect_err("long")
            .to_string();
        assert!(e.contains("it is 65 bytes long"), "{e}");
    }

    #[test]
    fn the_longest_name_fits_every_place_it_goes() {
        let max = ClusterName::new(&"z".repeat(ClusterName::MAX_LEN)).expect("max");
        // sockaddr_un.sun_path: 108 bytes with the terminating NUL.
        let socket = crate::paths::control_socket(&max);
        assert!(socket.as_os_str().len() < 108, "{}", socket.display());
        assert!(crate::paths::pin_dir(&max).as_os_str().len() < 4096);
        // The temporary pin folder `~tmp~<pid>~<name>` is one file name (NAME_MAX 255);
        // pids are at most 4194304.
        assert!("~tmp~4194304~".len() + max.len() <= 255);
        assert_eq!(chain_name(&max).len(), MAX_CHAIN_NAME);
        for len in 1..=ClusterName::MAX_LEN {
            let name = "y".repeat(len);
            let chain = chain_name(&name);
            assert!(chain.len() <= MAX_CHAIN_NAME, "{name}: {chain}");
        }
        // Used as they are while they fit; two long names with the same start differ.
        assert_eq!(
            chain_name("eighteen-chars-abc"),
            "IPCLUSTER-eighteen-chars-abc"
        );
        assert_ne!(
            chain_name("nineteen-chars-abcd"),
            chain_name("nineteen-chars-abce")
        );
    }

    #[test]
    fn the_command_line_and_every_backend_apply_the_same_rule() {
        use crate::steering::SteeringConfig;
        use crate::steering::ebpf::pins::cluster_pin_dir;
        use crate::steering::iptables::IptablesSteering;
        let long = "c".repeat(ClusterName::MAX_LEN + 1);
        let max = "c".repeat(ClusterName::MAX_LEN);
        for name in [
            "default", "web.1", "a/b", ".", "..", "", "-x", "x-", "~t", "a b", &long, &max,
        ] {
            let valid = ClusterName::new(name).is_ok();
            assert_eq!(crate::cli::parse_name(name).is_ok(), valid, "cli: {name:?}");
            assert_eq!(cluster_pin_dir(name).is_ok(), valid, "pin folder: {name:?}");
            let config = SteeringConfig {
                cluster: name.to_owned(),
                services: Vec::new(),
                interfaces: Vec::new(),
                flow_entries: 1,
            };
            let iptables = IptablesSteering::new(config);
            assert_eq!(iptables.is_ok(), valid, "iptables: {name:?}");
            if let Err(e) = iptables {
                assert!(e.to_string().contains(RULE), "{e}");
            }
        }
    }
}
