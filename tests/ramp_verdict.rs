//! The load generator's ramp verdict (benches/common/verdict.rs): which rate
//! is tried again, and which rate counts as sustained.

#[path = "../benches/common/verdict.rs"]
mod verdict;

use verdict::{next_trial, sustained_rate, Trial};

fn t(rate: f64, ok: bool) -> Trial {
    Trial {
        rate,
        ok,
        broken: false,
    }
}

fn lost(rate: f64) -> Trial {
    Trial {
        rate,
        ok: false,
        broken: true,
    }
}

#[test]
fn nothing_run_means_nothing_to_retry_or_report() {
    assert_eq!(next_trial(&[]), None);
    assert_eq!(sustained_rate(&[]), None);
}

#[test]
fn the_top_passing_rate_is_confirmed_first_then_the_failing_one_above() {
    let mut steps = vec![t(2.0, true), t(4.0, true), t(8.0, false)];
    assert_eq!(next_trial(&steps), Some(4.0));
    steps.push(t(4.0, true));
    assert_eq!(next_trial(&steps), Some(8.0));
    steps.push(t(8.0, false));
    assert_eq!(next_trial(&steps), None, "both settled");
    assert_eq!(sustained_rate(&steps), Some(4.0));
}

#[test]
fn a_failing_rate_that_passes_on_retry_needs_a_third_trial() {
    let mut steps = vec![t(2.0, true), t(2.0, true), t(4.0, false), t(4.0, true)];
    assert_eq!(next_trial(&steps), Some(4.0), "a tie is unsettled");
    assert_eq!(sustained_rate(&steps), Some(2.0), "a tie does not pass");
    steps.push(t(4.0, true));
    assert_eq!(sustained_rate(&steps), Some(4.0));
}

#[test]
fn a_top_rate_that_fails_its_confirmation_hands_over_to_the_next_lower() {
    let mut steps = vec![t(2.0, true), t(4.0, true), t(8.0, false)];
    steps.push(t(4.0, false));
    assert_eq!(next_trial(&steps), Some(4.0), "1 to 1 at 4");
    steps.push(t(4.0, false));
    assert_eq!(next_trial(&steps), Some(2.0), "4 failed: confirm 2");
    steps.push(t(2.0, true));
    assert_eq!(next_trial(&steps), None, "4 above it is settled");
    assert_eq!(sustained_rate(&steps), Some(2.0));
}

#[test]
fn a_step_that_lost_deliveries_is_never_retried_and_never_passes() {
    let steps = vec![t(2.0, true), t(2.0, true), lost(4.0)];
    assert_eq!(next_trial(&steps), None);
    assert_eq!(sustained_rate(&steps), Some(2.0));
}

#[test]
fn when_even_the_lowest_rate_fails_it_is_retried_once_more() {
    let mut steps = vec![t(2.0, false)];
    assert_eq!(next_trial(&steps), Some(2.0));
    steps.push(t(2.0, false));
    assert_eq!(next_trial(&steps), None);
    assert_eq!(sustained_rate(&steps), None);
}

#[test]
fn a_lucky_pass_above_a_failure_is_what_gets_checked() {
    // The ladder runs on past a failure; a pass above it is the candidate.
    let mut steps = vec![
        t(128.0, true),
        t(256.0, false),
        t(512.0, true),
        t(1024.0, false),
    ];
    assert_eq!(next_trial(&steps), Some(512.0));
    steps.push(t(512.0, false));
    steps.push(t(512.0, false));
    assert_eq!(next_trial(&steps), Some(128.0), "512 failed 2 to 1");
    steps.push(t(128.0, true));
    assert_eq!(next_trial(&steps), Some(256.0));
    steps.push(t(256.0, false));
    assert_eq!(next_trial(&steps), None);
    assert_eq!(sustained_rate(&steps), Some(128.0));
}
