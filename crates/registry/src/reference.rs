//! Image references, parsed and normalised as containerd and the
//! distribution project do (`busybox` → `docker.io/library/busybox:latest`).
//!
//! The grammar is distribution's `ReferenceRegexp`. oci-spec's own parser
//! compiles it with Unicode classes (its `\w` matches every script), which
//! costs about 60 ms of CPU the first time a process parses a reference:
//! every `pronto pull` paid it before its first request, and the daemon
//! paid it inside the call that announces a pull. Go's `\w`, which the
//! grammar is written for, is ASCII; compiled that way it takes well under
//! a millisecond, and the result is the same `Reference`.

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

use crate::{Reference, RegistryError, Result};

/// distribution's reference grammar: name (with an optional domain), an
/// optional tag, an optional digest.
const GRAMMAR: &str = concat!(
    r"^((?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])",
    r"(?:(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))+)?(?::[0-9]+)?/)?",
    r"[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?",
    r"(?:(?:/[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?)+)?)",
    r"(?::([0-9A-Za-z_][0-9A-Za-z_.-]{0,127}))?",
    r"(?:@([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$",
);

static REFERENCE: LazyLock<Regex> = LazyLock::new(|| {
    RegexBuilder::new(GRAMMAR)
        .unicode(false)
        .build()
        .expect("the reference grammar compiles")
});

/// The longest repository name distribution accepts.
const NAME_MAX: usize = 255;

/// Parses an image reference the way containerd normalises it:
/// `busybox` → `docker.io/library/busybox:latest`.
pub fn parse_reference(text: &str) -> Result<Reference> {
    let bad = |problem: &str| RegistryError::Reference {
        reference: text.to_owned(),
        problem: problem.to_owned(),
    };
    if text.is_empty() {
        return Err(bad("repository name must have at least one component"));
    }
    let parts = REFERENCE
        .captures(text)
        .ok_or_else(|| bad("invalid reference format"))?;
    let (registry, repository) = split_domain(&parts[1]);
    if repository.len() > NAME_MAX {
        return Err(bad("repository name must not be more than 255 characters"));
    }
    let tag = parts.get(2).map(|m| m.as_str().to_owned());
    let digest = parts.get(3).map(|m| m.as_str().to_owned());
    if let Some(digest) = &digest {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or_else(|| bad("invalid checksum digest format"))?;
        let length = match algorithm {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(bad("unsupported digest algorithm")),
        };
        if hex.len() != length {
            return Err(bad("invalid checksum digest length"));
        }
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag, digest)
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
        (tag, None) => {
            Reference::with_tag(registry, repository, tag.unwrap_or_else(|| "latest".into()))
        }
    })
}

/// The registry and repository of a validated name: a first component
/// with a dot or a port, or `localhost`, is a registry; anything else is
/// Docker Hub, where a one-component name lives under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".to_owned();
    }
    if domain == "docker.io" && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    (domain, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answers as oci-spec's parser (distribution's grammar with
    /// Unicode classes) on the references of its and distribution's tests.
    #[test]
    fn references_parse_as_oci_spec_parses_them() {
        let digest64 = "f".repeat(64);
        let digest128 = "f".repeat(128);
        let long_name = format!("a/{}", "b".repeat(260));
        let long_tag = format!("repo:{}", "t".repeat(129));
        let inputs = [
            "busybox".to_owned(),
            "test.com:tag".into(),
            "test.com:5000".into(),
            "test.com/repo:tag".into(),
            "test:5000/repo".into(),
            "test:5000/repo:tag".into(),
            format!("test:5000/repo@sha256:{digest64}"),
            format!("test:5000/repo:tag@sha256:{digest64}"),
            "lowercase:Uppercase".into(),
            "sub-dom1.foo.com/bar/baz/quux".into(),
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag".into(),
            "b.gcr.io/test.example.com/my-app:test.example.com".into(),
            "xn--n3h.com/myimage:xn--n3h.com".into(),
            format!("xn--7o8h.com/myimage:xn--7o8h.com@sha512:{digest128}"),
            "foo_bar.com:8080".into(),
            "foo/foo_bar.com:8080".into(),
            "opensuse/leap:15.3".into(),
            "localhost/app".into(),
            "localhost:5000/team/app:v1".into(),
            "index.docker.io/nginx".into(),
            "docker.io/library/nginx:1.25".into(),
            "127.0.0.1:5000/lazy/ml-model:v1".into(),
            // Refused.
            String::new(),
            ":justtag".into(),
            format!("@sha256:{digest64}"),
            "repo@sha256:ffff".into(),
            format!("repo@md5:{digest64}"),
            format!("repo@sha384:{digest64}"),
            "validname@invaliddigest:ffffffffffffffffffffffffffffffff".into(),
            "Uppercase:tag".into(),
            "test:5000/Uppercase/lowercase:tag".into(),
            "aa/asdf$$^/aa".into(),
            "app:bad tag".into(),
            "a//b".into(),
            "a:b:c".into(),
            long_name,
            long_tag,
        ];
        for input in &inputs {
            let ours = parse_reference(input).ok();
            let theirs = input.parse::<Reference>().ok();
            assert_eq!(ours, theirs, "{input:?}");
        }
    }

    /// A tag is ASCII, as in containerd (Go's `\w`); oci-spec's Unicode
    /// class would take this one.
    #[test]
    fn a_tag_outside_ascii_is_refused_as_containerd_refuses_it() {
        let err = parse_reference("repo:täg").unwrap_err().to_string();
        assert!(err.contains("invalid reference format"), "{err}");
    }

    #[test]
    fn short_names_are_normalised_like_containerd() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = parse_reference("127.0.0.1:5000/team/app@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert!(r.digest().is_some());
        assert!(parse_reference("app:bad tag").is_err());
        assert!(parse_reference("a//b").is_err());
    }
}
