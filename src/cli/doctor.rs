//! `pixtract doctor`: what this machine can run.

use std::path::PathBuf;
use std::process::ExitCode;

use pixtract::doctor::{self, DoctorOptions};
use pixtract::model::Device;
use pixtract::native::SearchPaths;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Model directory (holding pixtract-model.json) to check; repeatable. Default: every models/*/.
    #[arg(long = "model", value_name = "DIR")]
    models: Vec<PathBuf>,
    /// Device you intend to run on: cpu, cuda or cuda:N. With cuda, a CUDA provider that does not register
    /// is a failure (otherwise it is only noted).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Recompute the sha256 of every model file and compare with the manifest (slow on large models).
    #[arg(long)]
    verify_hashes: bool,
}

/// Exit code 0 when everything checked is usable, 1 otherwise (the report says how to fix it).
pub fn doctor(args: DoctorArgs) -> ExitCode {
    let opts = DoctorOptions {
        models: args.models,
        device: args.device,
        verify_hashes: args.verify_hashes,
    };
    let report = doctor::run(&opts, &SearchPaths::from_env());
    print!("{report}");
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
