//! Digest computation and verification. Pronto only trusts bytes whose
//! SHA-256 matches a digest that chains to the image manifest.

use sha2::{Digest as _, Sha256};

use pronto_metrics::{ErrorKind, metrics};

use crate::error::{RegistryError, Target};

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks that `bytes` have `expected` digest (only `sha256` is supported).
pub fn verify_digest(target: &Target, expected: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    check_algorithm(target, expected)?;
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(mismatch(target, expected, actual));
    }
    Ok(())
}

/// The error for bytes that hash to `actual` instead of `expected`,
/// counted in `pronto_errors_total{kind="verification"}`.
pub(crate) fn mismatch(target: &Target, expected: &str, actual: String) -> RegistryError {
    metrics().error(ErrorKind::Verification);
    RegistryError::DigestMismatch {
        target: target.clone(),
        expected: expected.to_owned(),
        actual,
    }
}

/// Rejects digests Pronto cannot verify, before any byte is fetched.
pub fn check_algorithm(target: &Target, digest: &str) -> Result<(), RegistryError> {
    let valid = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    });
    if valid {
        Ok(())
    } else {
        Err(RegistryError::Invalid {
            target: target.clone(),
            problem: format!("digest {digest:?} is not a sha256 digest Pronto can verify"),
        })
    }
}

/// A running SHA-256 over streamed content.
#[derive(Debug, Default)]
pub struct StreamDigest(Sha256);

impl StreamDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target::new(&crate::Repository::new("r", "n"), "blob")
    }

    #[test]
    fn digests_verify_and_mismatch_is_named() {
        let d = sha256_digest(b"abc");
        verify_digest(&target(), &d, b"abc").unwrap();
        let err = verify_digest(&target(), &d, b"abd")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&d), "{err}");
    }

    #[test]
    fn unsupported_digests_are_rejected() {
        assert!(check_algorithm(&target(), "sha512:00").is_err());
        assert!(check_algorithm(&target(), "sha256:../../etc/passwd").is_err());
        assert!(check_algorithm(&target(), &sha256_digest(b"")).is_ok());
    }
}
