//! Line items scored as sets, as Donut does (Kim et al., "OCR-free Document Understanding Transformer", 2022):
//!
//! - **Field F1**: every item is flattened to its leaves `(member, normalised value)`; over a document the
//!   predicted and labelled leaves are multisets and a true positive is a leaf in both (multiset intersection),
//!   so item order does not matter and a wrong digit costs one leaf, not the item. Summed over documents (micro).
//! - **Tree-edit-distance accuracy**: the list as a tree (root -> one node per item, in order -> one leaf per
//!   member, sorted by member, labelled `member=value`); accuracy = max(0, 1 - TED(prediction, label) /
//!   TED(empty, label)), averaged over the documents whose label has items. Zhang-Shasha edit distance with unit
//!   costs (insert, delete, relabel).
//!
//! Members are matched by name (the label item's key = the output struct's member); values are normalised by the
//! member's column type like any field.

use std::collections::BTreeMap;

use serde::Serialize;

use super::normalise::{FieldKind, normalise};

/// One list item: member -> value as text.
pub type Item = BTreeMap<String, String>;

/// The scores of one list field over all documents.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ItemScore {
    /// Output column (`items`).
    pub field: String,
    /// Documents whose label has the list (possibly empty).
    pub documents: usize,
    pub labelled_items: usize,
    pub predicted_items: usize,
    /// Leaves (member, value) in the labels, in the predictions, and in both.
    pub labelled_leaves: usize,
    pub predicted_leaves: usize,
    pub matched_leaves: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Mean tree-edit-distance accuracy over the documents whose label has at least one item.
    pub ted_accuracy: f64,
}

/// A document's items normalised: per item, its leaves sorted by member.
fn leaves(items: &[Item], kinds: &BTreeMap<String, FieldKind>, exact: bool) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|item| {
            item.iter()
                .filter_map(|(member, value)| {
                    let kind = kinds.get(member).copied().unwrap_or(FieldKind::Text);
                    normalise(value, kind, exact).map(|v| format!("{member}={v}"))
                })
                .collect()
        })
        .collect()
}

/// Size of the multiset intersection of two lists.
fn multiset_matches(a: &[String], b: &[String]) -> usize {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for x in a {
        *counts.entry(x.as_str()).or_default() += 1;
    }
    b.iter()
        .filter(|y| match counts.get_mut(y.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count()
}

/// An ordered labelled tree in post-order, as Zhang-Shasha needs it: per node its label, the post-order index of
/// its leftmost leaf, and the key roots.
struct PostOrder {
    labels: Vec<String>,
    leftmost: Vec<usize>,
    keyroots: Vec<usize>,
}

/// The tree of a list: root -> items -> their leaves.
fn list_tree(items: &[Vec<String>]) -> PostOrder {
    let mut labels = Vec::new();
    let mut leftmost = Vec::new();
    for item in items {
        let first = labels.len();
        for leaf in item {
            leftmost.push(labels.len());
            labels.push(leaf.clone());
        }
        leftmost.push(first);
        labels.push("<item>".to_string());
    }
    leftmost.push(0);
    labels.push("<list>".to_string());
    // Key roots: the highest node for each distinct leftmost leaf.
    let mut keyroots: Vec<usize> = (0..labels.len())
        .filter(|&i| !(i + 1..labels.len()).any(|j| leftmost[j] == leftmost[i]))
        .collect();
    keyroots.sort_unstable();
    PostOrder {
        labels,
        leftmost,
        keyroots,
    }
}

/// Zhang-Shasha tree edit distance, unit costs.
fn tree_edit_distance(a: &PostOrder, b: &PostOrder) -> usize {
    let (n, m) = (a.labels.len(), b.labels.len());
    let mut td = vec![vec![0usize; m]; n];
    for &i in &a.keyroots {
        for &j in &b.keyroots {
            let (li, lj) = (a.leftmost[i], b.leftmost[j]);
            let rows = i - li + 2;
            let cols = j - lj + 2;
            let mut fd = vec![vec![0usize; cols]; rows];
            for x in 1..rows {
                fd[x][0] = fd[x - 1][0] + 1;
            }
            for y in 1..cols {
                fd[0][y] = fd[0][y - 1] + 1;
            }
            for x in 1..rows {
                for y in 1..cols {
                    let (ni, nj) = (li + x - 1, lj + y - 1);
                    if a.leftmost[ni] == li && b.leftmost[nj] == lj {
                        let relabel = usize::from(a.labels[ni] != b.labels[nj]);
                        fd[x][y] = (fd[x - 1][y] + 1)
                            .min(fd[x][y - 1] + 1)
                            .min(fd[x - 1][y - 1] + relabel);
                        td[ni][nj] = fd[x][y];
                    } else {
                        let (px, py) = (a.leftmost[ni] - li, b.leftmost[nj] - lj);
                        fd[x][y] = (fd[x - 1][y] + 1)
                            .min(fd[x][y - 1] + 1)
                            .min(fd[px][py] + td[ni][nj]);
                    }
                }
            }
        }
    }
    td[n - 1][m - 1]
}

/// Donut's normalised tree-edit-distance accuracy of `predicted` against `label`.
pub fn ted_accuracy(predicted: &[Vec<String>], label: &[Vec<String>]) -> f64 {
    let (p, l, empty) = (list_tree(predicted), list_tree(label), list_tree(&[]));
    let worst = tree_edit_distance(&empty, &l);
    if worst == 0 {
        return 1.0;
    }
    (1.0 - tree_edit_distance(&p, &l) as f64 / worst as f64).max(0.0)
}

/// Accumulates one list field over documents.
#[derive(Debug, Default)]
pub struct ItemScorer {
    score: ItemScore,
    ted_sum: f64,
    ted_documents: usize,
}

impl ItemScorer {
    pub fn new(field: &str) -> Self {
        ItemScorer {
            score: ItemScore {
                field: field.to_string(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// One labelled document: `predicted` is None when the document has no prediction row (or a null list).
    pub fn add(
        &mut self,
        predicted: Option<&[Item]>,
        label: &[Item],
        kinds: &BTreeMap<String, FieldKind>,
        exact: bool,
    ) {
        let p = leaves(predicted.unwrap_or(&[]), kinds, exact);
        let l = leaves(label, kinds, exact);
        let s = &mut self.score;
        s.documents += 1;
        s.labelled_items += l.len();
        s.predicted_items += p.len();
        let flat = |v: &[Vec<String>]| v.iter().flatten().cloned().collect::<Vec<_>>();
        let (pf, lf) = (flat(&p), flat(&l));
        s.labelled_leaves += lf.len();
        s.predicted_leaves += pf.len();
        s.matched_leaves += multiset_matches(&pf, &lf);
        if !l.is_empty() {
            self.ted_sum += ted_accuracy(&p, &l);
            self.ted_documents += 1;
        }
    }

    pub fn finish(mut self) -> ItemScore {
        let s = &mut self.score;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        s.precision = ratio(s.matched_leaves, s.predicted_leaves);
        s.recall = ratio(s.matched_leaves, s.labelled_leaves);
        s.f1 = if s.precision + s.recall == 0.0 {
            0.0
        } else {
            2.0 * s.precision * s.recall / (s.precision + s.recall)
        };
        s.ted_accuracy = if self.ted_documents == 0 {
            0.0
        } else {
            self.ted_sum / self.ted_documents as f64
        };
        self.score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(items: &[&[&str]]) -> Vec<Vec<String>> {
        items
            .iter()
            .map(|i| i.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn edit_distance_counts_unit_operations() {
        let label = tree(&[&["a=1", "b=2"], &["a=3", "b=4"]]);
        // Empty prediction: delete nothing, insert 2 items + 4 leaves = 6 (the root matches).
        let empty = list_tree(&[]);
        assert_eq!(tree_edit_distance(&empty, &list_tree(&label)), 6);
        assert_eq!(
            tree_edit_distance(&list_tree(&label), &list_tree(&label)),
            0
        );
        // One wrong value: one relabel.
        let one_off = tree(&[&["a=1", "b=2"], &["a=3", "b=5"]]);
        assert_eq!(
            tree_edit_distance(&list_tree(&one_off), &list_tree(&label)),
            1
        );
        // A missing item: delete it and its 2 leaves.
        let short = tree(&[&["a=1", "b=2"]]);
        assert_eq!(
            tree_edit_distance(&list_tree(&short), &list_tree(&label)),
            3
        );
        assert!((ted_accuracy(&short, &label) - 0.5).abs() < 1e-12);
        assert!((ted_accuracy(&one_off, &label) - (1.0 - 1.0 / 6.0)).abs() < 1e-12);
    }

    #[test]
    fn leaves_match_as_multisets_whatever_the_item_order() {
        let a = vec!["x=1".to_string(), "x=1".to_string(), "y=2".to_string()];
        let b = vec!["y=2".to_string(), "x=1".to_string()];
        assert_eq!(multiset_matches(&a, &b), 2);
        assert_eq!(multiset_matches(&b, &a), 2);
    }
}
