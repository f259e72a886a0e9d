//! Compiles the vendored V2Ray 4.34 and Xray protos with `protox` (pure Rust: no system `protoc`)
//! and generates tonic clients and servers (servers back the test stand-ins).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for (root, files) in [
        (
            "proto/v2ray",
            [
                "app/proxyman/command/command.proto",
                "proxy/vless/account.proto",
            ],
        ),
        (
            "proto/xray",
            [
                "app/proxyman/command/command.proto",
                "proxy/vless/account.proto",
            ],
        ),
    ] {
        println!("cargo:rerun-if-changed={root}");
        let fds = protox::compile(files, [root])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
