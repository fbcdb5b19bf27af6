//! The instruction sent with the page images, built from the schema's titles and descriptions.

use super::schema::{ExtractionSchema, FieldDef, FieldType};

fn type_name(f: &FieldDef) -> String {
    let base = match &f.ty {
        FieldType::Utf8 => match &f.constraints.enum_values {
            Some(values) => {
                let list: Vec<String> = values
                    .iter()
                    .filter_map(|v| v.as_str().map(|s| format!("\"{s}\"")))
                    .collect();
                format!("one of {}", list.join(", "))
            }
            None => "text".into(),
        },
        FieldType::Int64 => "integer".into(),
        FieldType::Float64 | FieldType::Decimal { .. } => "amount/number".into(),
        FieldType::Boolean => "true/false".into(),
        FieldType::Date32 => "date YYYY-MM-DD".into(),
        FieldType::TimestampUs => "date-time YYYY-MM-DDTHH:MM:SSZ".into(),
        FieldType::Struct(_) => "object".into(),
        FieldType::List(item) => match item.ty {
            FieldType::Struct(_) => "list of objects".into(),
            _ => format!("list of {}", type_name(item)),
        },
    };
    if f.nullable {
        format!("{base}, or null")
    } else {
        base
    }
}

fn describe(fields: &[FieldDef], depth: usize, out: &mut String) {
    for f in fields {
        let indent = "  ".repeat(depth);
        out.push_str(&format!("{indent}- {} ({})", f.name, type_name(f)));
        match (&f.title, &f.description) {
            (Some(t), Some(d)) => out.push_str(&format!(": {t}. {d}")),
            (Some(t), None) => out.push_str(&format!(": {t}.")),
            (None, Some(d)) => out.push_str(&format!(": {d}")),
            (None, None) => {}
        }
        out.push('\n');
        match &f.ty {
            FieldType::Struct(children) => describe(children, depth + 1, out),
            FieldType::List(item) => {
                if let FieldType::Struct(children) = &item.ty {
                    describe(children, depth + 1, out)
                }
            }
            _ => {}
        }
    }
}

/// The extraction instruction for a schema.
pub fn schema_instruction(schema: &ExtractionSchema) -> String {
    let what = schema.title.as_deref().unwrap_or(&schema.name);
    let mut s =
        format!("Extract the fields of this {what} and answer with one JSON object only.\n");
    if let Some(d) = &schema.description {
        s.push_str(&format!("Document type: {d}\n"));
    }
    s.push_str(
        "Rules:\n\
         - The document may be in any language or script. Copy text values exactly as printed, in the document's \
         own language and script: do not translate, transliterate, correct or complete them.\n\
         - Dates: write YYYY-MM-DD whatever the printed order, separators or language of the month name \
         (\"7 mars 2024\", \"07.03.24\", \"2024年3月7日\" -> 2024-03-07). Times: 24-hour HH:MM or HH:MM:SS.\n\
         - Amounts: plain decimal numbers with a dot as the decimal separator and no currency symbol, thousands \
         separator or spaces (\"1.234,50 €\" -> 1234.5; \"$ 1,234.50\" -> 1234.5; \"¥1,200\" -> 1200); a credit \
         or discount printed with a minus sign stays negative.\n\
         - Currency: the ISO 4217 code (EUR, USD, GBP, JPY, CNY, ...) from the printed symbol or code.\n\
         - A field that is not printed or cannot be read is null; never guess. A list with nothing printed is [].\n\
         - Line items in printed order, one entry per printed line.\n\
         Fields:\n",
    );
    describe(&schema.fields, 0, &mut s);
    s
}

/// The instruction for free-text mode (plain transcription).
pub fn free_text_instruction() -> String {
    "Transcribe all text of this document exactly as printed, in reading order, in its own language and script. \
     Keep line breaks; do not translate, summarise or correct anything."
        .to_string()
}
