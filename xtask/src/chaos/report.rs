//! The chaos report: a table on the terminal, `report.md` and `report.json`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

/// One verified promise.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

impl Check {
    pub(crate) fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// How long one fault took to recover from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Recovery {
    pub(crate) fault: String,
    pub(crate) ms: f64,
}

/// What one scenario did and found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioReport {
    pub(crate) name: &'static str,
    pub(crate) title: &'static str,
    /// Why it did not run, if it did not.
    pub(crate) skipped: Option<String>,
    pub(crate) sent: u64,
    pub(crate) processed: u64,
    pub(crate) duplicates: u64,
    pub(crate) lost: u64,
    pub(crate) faults: u64,
    /// What the faults were, e.g. `3 SIGKILL`.
    pub(crate) fault_summary: String,
    pub(crate) recoveries: Vec<Recovery>,
    pub(crate) checks: Vec<Check>,
    pub(crate) notes: Vec<String>,
    pub(crate) seconds: f64,
}

impl ScenarioReport {
    pub(crate) fn new(name: &'static str, title: &'static str) -> Self {
        Self {
            name,
            title,
            skipped: None,
            sent: 0,
            processed: 0,
            duplicates: 0,
            lost: 0,
            faults: 0,
            fault_summary: String::new(),
            recoveries: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    pub(crate) fn skipped(name: &'static str, title: &'static str, why: String) -> Self {
        Self {
            skipped: Some(why),
            ..Self::new(name, title)
        }
    }

    pub(crate) fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check::new(name, ok, detail));
    }

    pub(crate) fn recovered(&mut self, fault: impl Into<String>, took: Duration) {
        self.recoveries.push(Recovery {
            fault: fault.into(),
            ms: took.as_secs_f64() * 1000.0,
        });
    }

    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub(crate) fn recovery_max_ms(&self) -> Option<f64> {
        self.recoveries.iter().map(|r| r.ms).reduce(f64::max)
    }

    fn result(&self) -> &'static str {
        match (&self.skipped, self.passed()) {
            (Some(_), _) => "skipped",
            (None, true) => "pass",
            (None, false) => "FAIL",
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) quick: bool,
    pub(crate) command: String,
    pub(crate) postgres: String,
    pub(crate) seconds: f64,
    pub(crate) scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.scenarios.iter().all(ScenarioReport::passed)
    }

    /// The summary table (Markdown, readable as plain text).
    pub(crate) fn table(&self) -> String {
        let mut rows = vec![[
            "scenario",
            "sent",
            "processed",
            "duplicates",
            "lost",
            "faults injected",
            "recovery max",
            "result",
        ]
        .map(str::to_owned)];
        for s in &self.scenarios {
            let faults = if s.fault_summary.is_empty() {
                s.faults.to_string()
            } else {
                format!("{} ({})", s.faults, s.fault_summary)
            };
            let recovery = s
                .recovery_max_ms()
                .map_or("-".to_owned(), |ms| format!("{:.0} ms", ms));
            rows.push([
                s.name.to_owned(),
                s.sent.to_string(),
                s.processed.to_string(),
                s.duplicates.to_string(),
                s.lost.to_string(),
                faults,
                recovery,
                s.result().to_owned(),
            ]);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
            }
        }
        out
    }

    /// `report.md`: the table, then per scenario its checks, recoveries and notes.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# pgbus chaos report\n");
        let _ = writeln!(
            out,
            "`{}`: seed {} ({}), {}, {:.0} s.\n",
            self.command,
            self.seed,
            if self.quick { "quick" } else { "full" },
            self.postgres,
            self.seconds
        );
        out.push_str(&self.table());
        for s in &self.scenarios {
            let _ = writeln!(out, "\n## {}: {}\n", s.name, s.title);
            if let Some(why) = &s.skipped {
                let _ = writeln!(out, "Skipped: {why}");
                continue;
            }
            let _ = writeln!(out, "{:.0} s.\n", s.seconds);
            for c in &s.checks {
                let mark = if c.ok { "ok" } else { "**FAILED**" };
                let _ = writeln!(out, "- {mark}: {} ({})", c.name, c.detail);
            }
            if !s.recoveries.is_empty() {
                let _ = writeln!(out, "\nRecovery:\n");
                for r in &s.recoveries {
                    let _ = writeln!(out, "- {}: {:.0} ms", r.fault, r.ms);
                }
            }
            if !s.notes.is_empty() {
                let _ = writeln!(out);
                for note in &s.notes {
                    let _ = writeln!(out, "- {note}");
                }
            }
        }
        out
    }

    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        let json = dir.join("report.json");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&json, text + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_fails_the_report_and_shows_in_the_table() {
        let mut ok = ScenarioReport::new("crashes", "Worker crashes");
        ok.sent = 10;
        ok.processed = 10;
        ok.faults = 3;
        ok.fault_summary = "3 SIGKILL".into();
        ok.check("every message processed", true, "0 lost");
        ok.recovered("kill 1", Duration::from_millis(2100));
        ok.recovered("kill 2", Duration::from_millis(2500));
        let mut bad = ScenarioReport::new("groups", "Groups under faults");
        bad.check("no overlap", false, "1 overlap");
        let skipped = ScenarioReport::skipped("restarts", "Database restarts", "no".into());
        let mut report = Report {
            seed: 7,
            quick: true,
            command: "cargo xtask chaos --quick --seed 7".into(),
            postgres: "PostgreSQL 15".into(),
            seconds: 1.0,
            scenarios: vec![ok, skipped],
        };
        assert!(report.passed());
        let table = report.table();
        assert!(table.contains("| crashes "), "{table}");
        assert!(table.contains("3 (3 SIGKILL)"), "{table}");
        assert!(table.contains("2500 ms"), "{table}");
        assert!(table.contains("skipped"), "{table}");
        assert!(table.contains("| pass "), "{table}");
        report.scenarios.push(bad);
        assert!(!report.passed());
        assert!(report.table().contains("FAIL"));
        assert!(report.markdown().contains("**FAILED**: no overlap"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["scenarios"][0]["recoveries"][1]["ms"], 2500.0);
    }
}
