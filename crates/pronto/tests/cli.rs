//! The `pronto` binary as a user runs it: help, version, configuration.

use std::process::{Command, Output};

fn pronto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args(args)
        .env_remove("PRONTO_CONFIG")
        .output()
        .expect("run pronto")
}

/// Runs `pronto --config FILE ARGS` with `config` as the file's text.
fn pronto_with_config(config: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let mut all = vec!["--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    pronto(&all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_matches_the_crate() {
    let out = pronto(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("pronto {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_commands_and_global_options() {
    let out = pronto(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "config",
        "--config <FILE>",
        "/etc/pronto/config.toml",
        "--log-level",
    ] {
        assert!(text.contains(needle), "help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn config_file_root_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "root = \"/srv/pronto-test\"\n").unwrap();
    let out = pronto(&["--config", path.to_str().unwrap(), "config", "show"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(
        shown.starts_with("root = \"/srv/pronto-test\"\n"),
        "{shown}"
    );
    assert!(
        shown.contains("[registry]\nhosts_dir = \"/etc/containerd/certs.d\""),
        "{shown}"
    );
}

#[test]
fn unknown_key_fails_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "root = \"/x\"\ncache_budget = 3\n").unwrap();
    let out = pronto(&["--config", path.to_str().unwrap(), "config", "check"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cache_budget"), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn missing_explicit_config_fails() {
    let out = pronto(&["--config", "/nonexistent/pronto.toml", "config", "check"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/pronto.toml"));
}

#[test]
fn config_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.toml");
    std::fs::write(&path, "root = \"/srv/from-env\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args(["config", "show"])
        .env("PRONTO_CONFIG", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("/srv/from-env"));
}

#[test]
fn status_without_a_daemon_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("pronto.sock");
    let out = pronto_with_config(
        &format!("address = \"{}\"\n", socket.display()),
        &["status"],
    );
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains(&socket.display().to_string()) && text.contains("pronto serve"),
        "{text}"
    );
}

#[test]
fn a_metrics_address_that_is_not_an_address_is_refused_by_key() {
    let out = pronto_with_config(
        "metrics_address = \"localhost:9746\"\n",
        &["config", "check"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("key `metrics_address`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let out = pronto(&["pull", "--namespace", "bad name", "127.0.0.1:9/none:v1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"bad name\" is not a containerd namespace"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    // Checked before anything is downloaded.
    let out = pronto(&["index", "create", "127.0.0.1:9/none:v1", "--span-size", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("64KiB minimum"), "{}", stderr(&out));

    let out = pronto_with_config("[cache]\nbudget = 12\n", &["config", "check"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("key `cache.budget`"),
        "{}",
        stderr(&out)
    );
}
