//! `talon`: the command-line interface to a Talon cluster (`cli` in the
//! library, so that the fuzzers parse its arguments as this binary does).

fn main() -> std::process::ExitCode {
    talon_client::cli::main()
}
