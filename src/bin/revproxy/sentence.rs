//! An error chain as one sentence, each reason said once. Shared by both binaries
//! (`revproxy-agent` includes this file by path).

/// `error: cause: cause`, leaving out a cause whose text is already said: an error whose
/// message embeds its source and also exposes it (`#[error("...: {source}")]` with a
/// `source` field) would otherwise print it twice, as anyhow's `{:#}` does.
pub(crate) fn sentence(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::sentence;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.toml: {source}")]
    struct Both {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let both = anyhow::Error::from(Both { source: io() });
        assert_eq!(
            format!("{both:#}"),
            "cannot read x.toml: no such file: no such file"
        );
        assert_eq!(sentence(&both), "cannot read x.toml: no such file");
        let context = anyhow::Error::from(io()).context("cannot start");
        assert_eq!(sentence(&context), "cannot start: no such file");
    }
}
