fn main() {
    std::process::exit(cachefs::cli::main());
}
