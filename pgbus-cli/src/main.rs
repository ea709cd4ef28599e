//! The `pgbus` command. Not built yet: the CLI issue fills it.
fn main() {
    eprintln!("pgbus: the command-line tool is not built yet; see README.md for what works");
    std::process::exit(2);
}
