//! Typed values that cross the wire: volume names and generations.
//!
//! A volume name becomes a directory name on every replica, so it is checked
//! here, once, at the edge: nothing that could escape the data directory
//! (`..`, `/`, NUL, leading dots) ever reaches a path.

use std::fmt;

/// An engine generation. Each engine start takes a higher one; a replica
/// refuses IO from a connection whose generation is older than its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation after this one; `None` when the counter is spent
    /// (no replica accepts a jump that large, so it cannot happen honestly).
    pub fn next(self) -> Option<Generation> {
        self.0.checked_add(1).map(Generation)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Longest volume name accepted. Kubernetes PV names (`pvc-<uuid>`) are 40.
pub const MAX_VOLUME_NAME_LEN: usize = 128;

/// A validated volume name: 1..=128 ASCII letters, digits, `-`, `_` or `.`,
/// starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("volume name is empty")]
    Empty,
    #[error("volume name is longer than {MAX_VOLUME_NAME_LEN} characters")]
    TooLong,
    #[error("volume name must start with a letter or digit")]
    BadStart,
    #[error("volume name may hold only letters, digits, '-', '_' and '.', found {0:?}")]
    BadChar(char),
}

impl VolumeName {
    pub fn new(name: impl Into<String>) -> Result<VolumeName, NameError> {
        let name = name.into();
        let first = name.chars().next().ok_or(NameError::Empty)?;
        if name.len() > MAX_VOLUME_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(VolumeName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VolumeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VolumeName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_style_names() {
        for ok in [
            "pvc-0b6c1f2e-9a1d-4c53-8f0e-1c2d3e4f5a6b",
            "db",
            "a.b_c-1",
            "9lives",
        ] {
            assert_eq!(VolumeName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_path_tricks() {
        assert_eq!(VolumeName::new(""), Err(NameError::Empty));
        assert_eq!(VolumeName::new(".."), Err(NameError::BadStart));
        assert_eq!(VolumeName::new(".hidden"), Err(NameError::BadStart));
        assert_eq!(VolumeName::new("/etc"), Err(NameError::BadStart));
        assert_eq!(VolumeName::new("a/../b"), Err(NameError::BadChar('/')));
        assert_eq!(VolumeName::new("a\0b"), Err(NameError::BadChar('\0')));
        assert_eq!(VolumeName::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(
            VolumeName::new("x".repeat(MAX_VOLUME_NAME_LEN + 1)),
            Err(NameError::TooLong)
        );
        assert!(VolumeName::new("x".repeat(MAX_VOLUME_NAME_LEN)).is_ok());
    }
}
