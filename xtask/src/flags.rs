//! The `--flag value` / `--flag=value` arguments of `cargo xtask COMMAND`.

/// A value-taking flag's value: the inline `=value`, else the next argument.
pub(crate) type Value<'a> = dyn FnMut() -> Result<String, String> + 'a;

/// Calls `each(flag, arg, inline, value)` for every argument, where `flag` is the name
/// before any `=`, `inline` says whether a `=value` was given and `value` yields the value.
pub(crate) fn walk(
    command: &str,
    args: &[String],
    mut each: impl FnMut(&str, &str, bool, &mut Value<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let has_inline = inline.is_some();
        let mut value = || match inline.clone().or_else(|| args.next().cloned()) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(format!("`{command} {flag}` needs a value")),
        };
        each(flag, arg, has_inline, &mut value)?;
    }
    Ok(())
}
