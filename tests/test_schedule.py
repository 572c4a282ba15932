"""The class schedule's clock (`provisioning.schedule.session_is_on`), without a database:
a weekly class is on from `lead_minutes` before it starts until it ends, in the class's own
time zone — across midnight, the week's wrap from Sunday to Monday and daylight-saving
changes. (Classes that would cross midnight are refused by the teacher's form.)"""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from provisioning.models import ClassSession
from provisioning.schedule import session_is_on

MON, SUN = 0, 6


def weekly(weekday: int, starts: str, ends: str, zone: str = "UTC", lead: int = 0) -> ClassSession:
    return ClassSession(
        weekday=weekday,
        starts=time.fromisoformat(starts),
        ends=time.fromisoformat(ends),
        timezone=zone,
        lead_minutes=lead,
    )


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


MONDAY_10_TO_11 = weekly(MON, "10:00", "11:00", lead=15)  # 2026-11-30 is a Monday


@pytest.mark.parametrize(
    ("now", "on"),
    [
        ("2026-11-30 09:44:59", False),  # before the lead time
        ("2026-11-30 09:45:00", True),  # lead time reached: warm for the class
        ("2026-11-30 10:59:59", True),
        ("2026-11-30 11:00:00", False),  # the end is not part of the class
        ("2026-12-01 10:30:00", False),  # Tuesday
        ("2026-12-07 10:30:00", True),  # next Monday
    ],
)
def test_a_class_is_on_from_its_lead_time_until_it_ends(now: str, on: bool) -> None:
    assert session_is_on(MONDAY_10_TO_11, utc(now)) is on


@pytest.mark.parametrize(
    ("now", "on"),
    [
        ("2026-11-29 23:44:59", False),  # Sunday evening, before the lead time
        ("2026-11-29 23:45:00", True),  # Sunday: the lead reaches back over midnight and the week
        ("2026-11-30 00:00:00", True),
        ("2026-11-30 00:59:59", True),
        ("2026-11-30 01:00:00", False),
        ("2026-11-23 00:30:00", True),  # the week before
    ],
)
def test_the_lead_time_of_a_monday_class_reaches_back_into_sunday(now: str, on: bool) -> None:
    just_after_midnight = weekly(MON, "00:15", "01:00", lead=30)
    assert session_is_on(just_after_midnight, utc(now)) is on


@pytest.mark.parametrize(
    ("now", "on"),
    [
        ("2026-11-29 23:30:00", True),  # Sunday
        ("2026-11-29 23:59:58", True),
        ("2026-11-30 00:00:00", False),  # Monday: the week wrapped, the class is over
        ("2026-11-28 23:30:00", False),  # Saturday
    ],
)
def test_a_sunday_class_ends_before_the_week_wraps_to_monday(now: str, on: bool) -> None:
    assert session_is_on(weekly(SUN, "23:00", "23:59:59"), utc(now)) is on


@pytest.mark.parametrize(
    ("now", "on"),
    [
        # Berlin in winter (CET, UTC+1): Monday 10:00-11:00 is 09:00-10:00 UTC.
        ("2026-03-23 08:50:00", True),  # 09:50 local, within the lead
        ("2026-03-23 09:30:00", True),
        ("2026-03-23 10:05:00", False),
        # The clocks went forward on Sunday 29 March (CEST, UTC+2): the class moves in UTC.
        ("2026-03-30 07:45:00", True),  # 09:45 local
        ("2026-03-30 08:50:00", True),
        ("2026-03-30 09:05:00", False),  # 11:05 local, although 10:05 local a week ago
        ("2026-03-30 07:40:00", False),
    ],
)
def test_a_berlin_class_keeps_its_local_hour_across_the_spring_change(now: str, on: bool) -> None:
    assert session_is_on(weekly(MON, "10:00", "11:00", "Europe/Berlin", lead=15), utc(now)) is on


@pytest.mark.parametrize(
    ("now", "on"),
    [
        # Sunday 8 March 2026, New York's clocks go forward at 02:00 (EST UTC-5 -> EDT UTC-4):
        # a 09:00-10:00 class that same Sunday is 13:00-14:00 UTC.
        ("2026-03-08 13:30:00", True),
        ("2026-03-08 14:30:00", False),  # would be 09:30 EST: not the local hour any more
        ("2026-03-01 14:30:00", True),  # the Sunday before (EST): 09:30 local
        # Sunday 1 November 2026, back at 02:00 (EDT -> EST): 09:00-10:00 is 14:00-15:00 UTC.
        ("2026-11-01 13:30:00", False),  # 08:30 local
        ("2026-11-01 14:30:00", True),
        ("2026-10-25 13:30:00", True),  # the Sunday before (EDT): 09:30 local
    ],
)
def test_a_new_york_class_follows_both_daylight_saving_changes(now: str, on: bool) -> None:
    assert session_is_on(weekly(SUN, "09:00", "10:00", "America/New_York"), utc(now)) is on


def test_the_hour_new_york_repeats_in_november_counts_twice() -> None:
    """01:00-02:00 local happens twice on 1 November 2026 (EDT, then EST): both are class."""
    night = weekly(SUN, "01:00", "02:00", "America/New_York")
    assert session_is_on(night, utc("2026-11-01 05:30:00"))  # 01:30 EDT
    assert session_is_on(night, utc("2026-11-01 06:30:00"))  # 01:30 EST
    assert not session_is_on(night, utc("2026-11-01 07:30:00"))  # 02:30 EST


def test_the_same_instant_is_judged_in_each_class_s_own_time_zone() -> None:
    now = utc("2026-11-30 09:30:00")  # 10:30 in Berlin, 04:30 in New York
    assert session_is_on(weekly(MON, "10:00", "11:00", "Europe/Berlin"), now)
    assert not session_is_on(weekly(MON, "10:00", "11:00", "America/New_York"), now)
    # An aware `now` in any zone is the same instant.
    assert session_is_on(
        weekly(MON, "10:00", "11:00", "Europe/Berlin"),
        now.astimezone(datetime.now().astimezone().tzinfo),
    )


def test_an_unknown_time_zone_is_read_as_utc() -> None:
    stored = weekly(MON, "10:00", "11:00", "Mars/Olympus_Mons")
    assert session_is_on(stored, utc("2026-11-30 10:30:00"))
    assert not session_is_on(stored, utc("2026-11-30 09:30:00"))
