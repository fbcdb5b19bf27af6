//! `pixtract eval`: an output's accuracy against labelled documents.

use std::path::PathBuf;

use anyhow::Context;

use pixtract::eval::{self, EvalOptions, FieldMap, LabelSet, Predictions};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The predictions: a pixtract output (its committed Parquet files, read recursively): a folder, one
    /// .parquet file, or an object-store prefix (s3://, gs://, az://; credentials from the usual environment).
    #[arg(long, value_name = "PATH")]
    predictions: String,
    /// The labels: a folder of one JSON object per document, named like the document (SROIE's 000.json beside
    /// 000.jpg, or key/*.json; invoice2data's tests/compare/*.json), a labels.jsonl whose lines carry
    /// "document" (file name or URI) and the fields, or one .json object of document name -> labels (the demo's
    /// ground_truth.json).
    #[arg(long, value_name = "PATH")]
    labels: PathBuf,
    /// Which label key is scored against which output column, LABEL_KEY=FIELD; repeatable. A label's array of
    /// objects mapped to a list column (items=items) is scored as line items. Default: SROIE's keys against
    /// schemas/receipt.json when the labels have them (company=merchant_name, date=transaction_date,
    /// address=merchant_address, total=total), else every label key that names an output column.
    #[arg(long = "map", value_name = "KEY=FIELD")]
    map: Vec<FieldMap>,
    /// A mapping file instead of --map: TOML with `[fields]` of label_key = "column", e.g.
    /// schemas/mappings/invoice2data.toml (invoice2data's tests/compare/*.json against schemas/invoice.json).
    #[arg(long, value_name = "FILE.toml", conflicts_with = "map")]
    mapping: Option<PathBuf>,
    /// Compare text exactly (default: case and runs of whitespace folded). Amounts and dates are always compared
    /// as values.
    #[arg(long)]
    exact: bool,
    /// Precision the per-field confidence threshold must reach (values under it would go to a person).
    #[arg(long, default_value_t = 0.99, value_name = "P")]
    target_precision: f64,
    /// Reliability bins for the calibration table.
    #[arg(long, default_value_t = 10)]
    bins: usize,
    /// Print the report as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also score grounding, per field: how often a predicted value found on its page (`_grounded`) is right
    /// against one that is not, and the labelled values located in their documents' text layers (documents
    /// re-read from each row's source_uri; scans are skipped): found, ambiguous, missing, and where the labels
    /// say where each value is drawn (`_locations`, as `scripts/make_samples.py --digital` writes), the share
    /// of boxes found there.
    #[arg(long)]
    grounding: bool,
    /// Also write one row per document and field (document, field, predicted, expected, outcome, confidence)
    /// to this Parquet file.
    #[arg(long, value_name = "FILE.parquet")]
    out_parquet: Option<PathBuf>,
}

/// Runs the evaluation and prints it. Exit code 0 when it ran (whatever the scores), 1 when it could not.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let predictions = Predictions::load(&args.predictions)
        .with_context(|| format!("reading predictions {}", args.predictions))?;
    let labels = LabelSet::load(&args.labels)
        .with_context(|| format!("reading labels {}", args.labels.display()))?;
    let opts = EvalOptions {
        mapping: match (&args.mapping, args.map.is_empty()) {
            (Some(file), _) => eval::mapping_from_file(file)?,
            (None, false) => args.map,
            (None, true) => eval::default_mapping(&labels, &predictions),
        },
        exact: args.exact,
        target_precision: args.target_precision,
        bins: args.bins,
    };
    let mut report = eval::evaluate(&predictions, &labels, &opts)?;
    let mut grounding_note = None;
    if args.grounding {
        let mut scores = eval::grounding::of_predictions(&report, &predictions);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let (searched, skipped) = runtime.block_on(eval::grounding::locate_labels(
            &labels,
            &predictions,
            &opts.mapping,
            &mut scores,
        ))?;
        grounding_note = Some(format!(
            "grounding: labelled values located in {searched} documents' text layers ({skipped} without one or unreadable)\n{}",
            eval::grounding::table(&scores)
        ));
        report.grounding = Some(scores.into_values().collect());
    }
    if let Some(path) = &args.out_parquet {
        eval::write_outcomes(&report, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} labelled documents, {} predicted ({} rows in {} files), {} without labels",
            labels.documents.len(),
            predictions.documents.len(),
            predictions.rows,
            predictions.files,
            report.unlabelled_documents
        );
        print!("{}", report.table());
        if let Some(note) = &grounding_note {
            print!("{note}");
        }
        if let Some(path) = &args.out_parquet {
            println!("per-field outcomes: {}", path.display());
        }
    }
    Ok(())
}
