//! The page: one self-contained HTML file (inline CSS and SVG, no script, nothing fetched), each chart followed by
//! the table of the numbers it plots, so a reader (or a test) can check one against the other.

use std::fmt::Write;

use super::ReportError;
use super::RunReport;
use super::charts;
use super::figures::{CONFIDENCE_BINS, pages_of};
use super::{EvalFigures, RunOutput};

/// Text made safe for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:960px;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}\
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.note{color:#555;font-size:.9em}svg{display:block;max-width:100%;height:auto}\
details{margin:.3em 0 1em}summary{cursor:pointer;color:#355}";

fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{:.1}%", v * 100.0))
}

/// A table whose columns listed in `numeric` are right-aligned numbers.
fn table(id: &str, head: &[&str], rows: &[Vec<String>], numeric: &[usize]) -> String {
    let mut s = format!("<table id=\"{id}\"><thead><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if numeric.contains(&i) {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(s, "<td{class}>{cell}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

fn data(inner: String) -> String {
    format!("<details><summary>numbers plotted</summary>{inner}</details>")
}

/// The page, section by section in reading order; a section the run has nothing for is left out (confidence
/// without schema fields, accuracy without `pixtract eval --json` output, the run list for an output of one run).
pub fn render(report: &RunReport) -> Result<String, ReportError> {
    let run = &report.run;
    let mut page = header(report);
    page.push_str(&summary(run));
    page.push_str(&throughput(report)?);
    page.push_str(&stage_shares(run)?);
    page.push_str(&errors(report));
    page.push_str(&fill_rates(report)?);
    if !report.fields.is_empty() {
        page.push_str(&confidence(report)?);
    }
    // Accuracy, when `pixtract eval --json` output was given.
    if let Some(eval) = &report.eval {
        page.push_str(&accuracy(eval)?);
    }
    // The other runs in the same output.
    if run.runs.len() > 1 {
        page.push_str(&other_runs(run));
    }
    page.push_str("</body></html>\n");
    Ok(page)
}

/// The document's head, the title, where the run's output is and when it ran, and why it stopped early if it did.
fn header(report: &RunReport) -> String {
    let run = &report.run;
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>pixtract run report {}</title><style>{STYLE}</style></head><body>",
        escape(&run.run_id)
    );
    let _ = write!(
        page,
        "<h1>pixtract run <span id=\"run-id\">{}</span></h1>",
        escape(&run.run_id)
    );
    let pipeline = run
        .summary
        .as_ref()
        .map(|s| s.pipeline.as_str())
        .unwrap_or("");
    let _ = write!(
        page,
        "<p class=\"note\">output <code>{}</code>{}; report made {} from {} Parquet file(s){}.</p>",
        escape(&run.target),
        if pipeline.is_empty() {
            String::new()
        } else {
            format!(", pipeline <code>{}</code>", escape(pipeline))
        },
        report.generated_at.format("%Y-%m-%d %H:%M:%S UTC"),
        run.files.len(),
        match &run.manifest {
            Some(m) => format!(
                "; run from {} to {} UTC",
                m.started_at.format("%Y-%m-%d %H:%M:%S"),
                m.finished_at.format("%H:%M:%S")
            ),
            None => "; no manifest: the run did not finish (its committed files are shown)".into(),
        }
    );
    if let Some(reason) = run.summary.as_ref().and_then(|s| s.aborted.as_ref()) {
        let _ = write!(
            page,
            "<p><strong>Stopped early:</strong> {}</p>",
            escape(reason)
        );
    }
    page
}

/// Summary: counted from the rows, with the run summary's own figures beside them when it finished.
fn summary(run: &RunOutput) -> String {
    let mut page =
        String::from("<section id=\"summary\"><h2>Summary</h2><table id=\"summary-table\"><tbody>");
    for (key, value) in &summary_rows(run) {
        let _ = write!(
            page,
            "<tr><th>{}</th><td class=\"n\" data-key=\"{key}\">{value}</td></tr>",
            key.replace('_', " ")
        );
    }
    page.push_str("</tbody></table></section>");
    page
}

/// The summary table's (key, value) rows: counts from the rows, then the run summary's figures (and its decode
/// figures) when there is one.
fn summary_rows(run: &RunOutput) -> Vec<(&'static str, String)> {
    let rows = &run.rows;
    let count = |status: &str| rows.iter().filter(|r| r.status == status).count();
    let mut documents: Vec<&str> = rows.iter().map(|r| r.source_uri.as_str()).collect();
    documents.sort_unstable();
    documents.dedup();
    let mut summary_rows = vec![
        ("rows", rows.len().to_string()),
        ("rows_ok", count("ok").to_string()),
        ("rows_error", count("error").to_string()),
        ("rows_retry", count("retry").to_string()),
        ("documents", documents.len().to_string()),
        (
            "pages",
            rows.iter().map(pages_of).sum::<usize>().to_string(),
        ),
    ];
    if let Some(s) = &run.summary {
        summary_rows.extend([
            ("documents_skipped", s.documents_skipped.to_string()),
            ("seconds", format!("{:.1}", s.seconds)),
            ("pages_per_second", format!("{:.2}", s.pages_per_second)),
            ("prompt_tokens", s.prompt_tokens.to_string()),
            ("generated_tokens", s.generated_tokens.to_string()),
        ]);
        if let Some(d) = &s.decode {
            summary_rows.extend([
                ("batching", format!("{} x{}", d.batching, d.slots)),
                ("slot_admissions", d.admissions.to_string()),
                ("decode_steps", d.steps.to_string()),
                (
                    "idle_row_share",
                    format!("{:.1}%", 100.0 * d.idle_row_share),
                ),
                ("host_ms_per_step", format!("{:.2}", d.host_ms_per_step)),
                ("scheduling_ceiling", format!("{:.2}x", d.ceiling)),
            ]);
        }
    }
    summary_rows
}

/// Throughput: rows and pages over the run's time.
fn throughput(report: &RunReport) -> Result<String, ReportError> {
    let mut page = String::from("<section id=\"throughput\"><h2>Throughput</h2>");
    if report.throughput.is_empty() {
        page.push_str("<p>No rows.</p>");
    } else {
        page.push_str(&charts::throughput(&report.throughput)?);
        page.push_str(
            "<p class=\"note\">Rows and the pages they cover, by the time each row was produced \
             (<code>processed_at</code>).</p>",
        );
        let cells: Vec<Vec<String>> = report
            .throughput
            .iter()
            .map(|b| {
                vec![
                    format!("{}", b.start_s),
                    b.rows.to_string(),
                    b.pages.to_string(),
                ]
            })
            .collect();
        page.push_str(&data(table(
            "throughput-table",
            &["from second", "rows", "pages"],
            &cells,
            &[0, 1, 2],
        )));
    }
    page.push_str("</section>");
    Ok(page)
}

/// Stage busy shares, from the run summary.
fn stage_shares(run: &RunOutput) -> Result<String, ReportError> {
    let mut page = String::from("<section id=\"stages\"><h2>Stage busy shares</h2>");
    match run.summary.as_ref().filter(|s| !s.stages.is_empty()) {
        Some(s) => {
            page.push_str(&charts::stage_shares(&s.stages)?);
            page.push_str(
                "<p class=\"note\">Seconds each stage spent working over the run's wall time; the busiest stage \
                 bounds the throughput.</p>",
            );
            let cells: Vec<Vec<String>> = s
                .stages
                .iter()
                .map(|st| {
                    vec![
                        escape(&st.stage),
                        format!("{:.3}", st.busy_seconds),
                        pct(Some(st.share)),
                    ]
                })
                .collect();
            page.push_str(&data(table(
                "stages-table",
                &["stage", "busy seconds", "share of wall time"],
                &cells,
                &[1, 2],
            )));
        }
        None => page.push_str("<p>Not recorded: the run has no manifest.</p>"),
    }
    page.push_str("</section>");
    Ok(page)
}

/// Errors by cause.
fn errors(report: &RunReport) -> String {
    let mut page = String::from("<section id=\"errors\"><h2>Errors by cause</h2>");
    if report.errors.is_empty() {
        page.push_str("<p id=\"no-errors\">Every row is ok.</p>");
    } else {
        let cells: Vec<Vec<String>> = report
            .errors
            .iter()
            .map(|g| {
                let docs = g
                    .documents
                    .iter()
                    .map(|d| format!("<li>{}</li>", escape(d)))
                    .collect::<String>();
                vec![
                    escape(&g.status),
                    escape(&g.kind),
                    escape(&g.cause),
                    g.rows.to_string(),
                    format!("<ul>{docs}</ul>"),
                    format!("<small>{}</small>", escape(&g.example)),
                ]
            })
            .collect();
        page.push_str(&table(
            "error-table",
            &[
                "status",
                "kind",
                "cause",
                "rows",
                "documents",
                "example message",
            ],
            &cells,
            &[3],
        ));
        page.push_str(
            "<p class=\"note\"><code>retry</code>: a transient failure the next run tries again. The kind is the \
             rows' <code>error_kind</code> column; the cause is the message up to its first detail.</p>",
        );
    }
    page.push_str("</section>");
    page
}

/// Fill rates per field.
fn fill_rates(report: &RunReport) -> Result<String, ReportError> {
    let mut page = String::from("<section id=\"fill\"><h2>Fill rate per field</h2>");
    if report.fields.is_empty() {
        page.push_str("<p>No schema fields (free-text output).</p>");
    } else {
        page.push_str(&charts::fill_rates(&report.fields)?);
        page.push_str(
            "<p class=\"note\">Share of rows holding a value (not null, not blank, not an empty list): over the \
             rows the model answered (ok, or closed early by the token budget) and over the ok rows.</p>",
        );
        let cells: Vec<Vec<String>> = report
            .fields
            .iter()
            .map(|f| {
                vec![
                    escape(&f.field),
                    f.answered.to_string(),
                    f.filled.to_string(),
                    pct(f.rate()),
                    f.ok_rows.to_string(),
                    f.ok_filled.to_string(),
                    pct(f.ok_rate()),
                ]
            })
            .collect();
        page.push_str(&table(
            "fill-table",
            &[
                "field",
                "answered rows",
                "filled",
                "fill rate",
                "ok rows",
                "filled (ok)",
                "fill rate (ok)",
            ],
            &cells,
            &[1, 2, 3, 4, 5, 6],
        ));
    }
    page.push_str("</section>");
    Ok(page)
}

/// Confidences per field (only for schema fields).
fn confidence(report: &RunReport) -> Result<String, ReportError> {
    let mut page = String::from("<section id=\"confidence\"><h2>Confidence per field</h2>");
    page.push_str(&charts::confidence_histograms(&report.fields)?);
    page.push_str(
        "<p class=\"note\">Filled values by their confidence: the probability of the least probable token \
         behind the value (<code>_confidence.&lt;field&gt;.min</code>), in bins of 0.1.</p>",
    );
    let mut head: Vec<String> = vec!["field".into()];
    head.extend((0..CONFIDENCE_BINS).map(|i| {
        format!(
            "{:.1}-{:.1}",
            i as f64 / CONFIDENCE_BINS as f64,
            (i + 1) as f64 / CONFIDENCE_BINS as f64
        )
    }));
    head.push("no confidence".into());
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    let cells: Vec<Vec<String>> = report
        .fields
        .iter()
        .map(|f| {
            let mut row = vec![escape(&f.field)];
            row.extend(f.confidence_bins.iter().map(|c| c.to_string()));
            row.push(f.without_confidence.to_string());
            row
        })
        .collect();
    let numeric: Vec<usize> = (1..=CONFIDENCE_BINS + 1).collect();
    page.push_str(&data(table("confidence-table", &head, &cells, &numeric)));
    page.push_str("</section>");
    Ok(page)
}

/// Accuracy against labels: the micro and macro figures, the scores per field, then calibration.
fn accuracy(eval: &EvalFigures) -> Result<String, ReportError> {
    let mut page = String::from("<section id=\"eval\"><h2>Accuracy against labels</h2>");
    let _ = write!(
        page,
        "<p>micro: precision <span id=\"micro-precision\">{:.3}</span>, recall {:.3}, F1 \
         <span id=\"micro-f1\">{:.3}</span> over {} labelled values; macro F1 {:.3}; expected calibration \
         error <span id=\"ece\">{:.3}</span> over {} values.</p>",
        eval.micro.precision,
        eval.micro.recall,
        eval.micro.f1,
        eval.micro.labelled,
        eval.macro_f1,
        eval.calibration.ece,
        eval.calibration.values
    );
    page.push_str(&charts::eval_scores(&eval.fields)?);
    let cells: Vec<Vec<String>> = eval
        .fields
        .iter()
        .map(|f| {
            vec![
                escape(&f.field),
                f.labelled.to_string(),
                f.correct.to_string(),
                f.wrong.to_string(),
                f.missed.to_string(),
                f.spurious.to_string(),
                format!("{:.3}", f.precision),
                format!("{:.3}", f.recall),
                format!("{:.3}", f.f1),
            ]
        })
        .collect();
    page.push_str(&table(
        "eval-table",
        &[
            "field",
            "labelled",
            "right",
            "wrong",
            "missed",
            "spurious",
            "precision",
            "recall",
            "F1",
        ],
        &cells,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    ));
    page.push_str(&calibration(eval)?);
    page.push_str("</section>");
    Ok(page)
}

/// Calibration: the reliability chart, and the confidence threshold per field that reaches the target precision.
fn calibration(eval: &EvalFigures) -> Result<String, ReportError> {
    let mut page = String::from("<h3>Calibration</h3>");
    page.push_str(&charts::reliability(&eval.calibration)?);
    let cells: Vec<Vec<String>> = eval
        .thresholds
        .iter()
        .map(|t| {
            vec![
                escape(&t.field),
                t.threshold
                    .map_or_else(|| "none reaches it".into(), |v| format!("{v:.3}")),
                format!("{:.3}", t.precision),
                pct(Some(t.kept)),
            ]
        })
        .collect();
    let _ = write!(
        page,
        "<p>Confidence threshold per field for a precision of {:.2}:</p>",
        eval.target_precision
    );
    page.push_str(&table(
        "threshold-table",
        &["field", "threshold", "precision", "values kept"],
        &cells,
        &[1, 2, 3],
    ));
    Ok(page)
}

/// The runs in this output, this report's marked.
fn other_runs(run: &RunOutput) -> String {
    let mut page = String::from("<section id=\"runs\"><h2>Runs in this output</h2><ul>");
    for r in &run.runs {
        let mark = if *r == run.run_id {
            " (this report)"
        } else {
            ""
        };
        let _ = write!(page, "<li><code>{}</code>{mark}</li>", escape(r));
    }
    page.push_str(
        "</ul><p class=\"note\"><code>pixtract report OUTPUT --run RUN_ID</code> reports another.</p></section>",
    );
    page
}
