"""The pure AMI -> lifecycle mapping, one test per row of docs/sources/asterisk.md's mapping table,
plus the field reports of AMI screen pops (issue 11, item 4). Events are built as Asterisk 22 sends
them (PJSIP phones, FreePBX Local members), trimmed to the headers the mapping reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spop_cli.sources.asterisk_map import AsteriskMapper, MapConfig

T0 = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
CALL = "1700000000.1"


class Pbx:
    """A call told as AMI events; `events()` gives what the mapper sent, without `at`."""

    def __init__(self, **config: Any) -> None:
        self.mapper = AsteriskMapper(MapConfig(**config))
        self.out: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.ats: list[str] = []

    def ev(self, name: str, after: float = 0.0, **headers: str) -> list[dict[str, Any]]:
        self.seconds += after
        event = {"Event": name, **headers}
        got = self.mapper.feed(event, T0 + timedelta(seconds=self.seconds))
        for e in got:
            self.ats.append(e.pop("at"))
        self.out.extend(got)
        return got

    def channel(
        self,
        channel: str,
        uid: str,
        context: str = "from-pstn",
        exten: str = "5551000",
        linkedid: str = CALL,
        num: str = "+4930123",
    ) -> None:
        self.ev(
            "Newchannel",
            Channel=channel,
            Uniqueid=uid,
            Linkedid=linkedid,
            Context=context,
            Exten=exten,
            CallerIDNum=num,
            CallerIDName="Ann Caller",
        )

    def hangup(self, channel: str, uid: str, linkedid: str = CALL) -> None:
        self.ev("Hangup", Channel=channel, Uniqueid=uid, Linkedid=linkedid)

    def inbound(self) -> None:
        """A trunk call to DID 5551000, which the dialplan tags with data."""
        self.channel("PJSIP/trunk-00000001", CALL)
        self.ev(
            "VarSet",
            Channel="PJSIP/trunk-00000001",
            Uniqueid=CALL,
            Linkedid=CALL,
            Variable="__SPOP_CUSTOMER_ID",
            Value="C-42",
        )

    def join(self, queue: str = "support") -> None:
        self.ev(
            "QueueCallerJoin",
            Channel="PJSIP/trunk-00000001",
            Uniqueid=CALL,
            Linkedid=CALL,
            Queue=queue,
            CallerIDNum="+4930123",
            CallerIDName="Ann Caller",
            Position="1",
        )

    def called(self, interface: str, dest: str, queue: str = "support", after: float = 0.0) -> None:
        self.ev(
            "AgentCalled",
            after,
            Channel="PJSIP/trunk-00000001",
            Uniqueid=CALL,
            Linkedid=CALL,
            Queue=queue,
            Interface=interface,
            DestChannel=dest,
        )

    def connect(
        self, interface: str, dest: str, hold: str = "7", queue: str = "support", after: float = 0.0
    ) -> None:
        self.ev(
            "AgentConnect",
            after,
            Channel="PJSIP/trunk-00000001",
            Uniqueid=CALL,
            Linkedid=CALL,
            Queue=queue,
            Interface=interface,
            DestChannel=dest,
            HoldTime=hold,
        )

    def brief(self) -> list[tuple[str, ...]]:
        return [
            (e["event"], e.get("resource", ""), e.get("from", ""), e.get("redirect", ""))
            for e in self.out
        ]


def queued_call(**config: Any) -> Pbx:
    pbx = Pbx(**config)
    pbx.inbound()
    pbx.join()
    return pbx


# -- the mapping table, row by row ----------------------------------------------------------------
def test_row_queue_caller_join_is_queued_with_caller_dnid_queue_and_data() -> None:
    pbx = queued_call(queue_names={"support": "Support FR"})
    assert pbx.out == [
        {
            "contact_id": CALL,
            "event": "queued",
            "source": "+4930123",
            "destination": "5551000",
            "queue_name": "Support FR",
            "contact_data": {"CUSTOMER_ID": "C-42", "caller_name": "Ann Caller"},
            "media": "telephone",
        }
    ]
    assert pbx.ats == ["2026-01-05T09:00:00.000Z"]


def test_row_agent_called_is_routed_to_the_member_resource() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002", after=4)
    assert pbx.brief()[1:] == [("routed", "1001", "", "")]
    assert pbx.ats[1] == "2026-01-05T09:00:04.000Z"


@pytest.mark.parametrize(
    ("interface", "resource"),
    [
        ("PJSIP/1001", "1001"),
        ("SIP/1001", "1001"),
        ("IAX2/1001", "1001"),
        ("Local/1001@from-queue/n", "1001"),
        ("Local/100@agents/n", "100"),
    ],
)
def test_row_agent_resource_from_interface_by_pattern(interface: str, resource: str) -> None:
    pbx = queued_call()
    pbx.called(interface, interface.replace("/n", "") + "-00000002;1")
    assert pbx.brief()[1] == ("routed", resource, "", "")


def test_row_agent_pattern_and_resource_names_are_configurable() -> None:
    pbx = queued_call(agent_patterns=(r"^PJSIP/agent-(\w+)",), resource_names={"alice": "13579"})
    pbx.called("PJSIP/agent-alice", "PJSIP/agent-alice-00000002")
    pbx.called("PJSIP/trunk2", "PJSIP/trunk2-00000003")  # matches no pattern: not an agent
    assert pbx.brief()[1:] == [("routed", "13579", "", "")]


def test_row_agent_connect_is_answered() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.connect("PJSIP/1001", "PJSIP/1001-00000002")
    assert pbx.brief()[1:] == [("routed", "1001", "", ""), ("answered", "1001", "", "")]


def test_row_pop_on_answer_pops_at_agent_connect_with_hold_time_as_the_wait() -> None:
    pbx = queued_call(pop_on="answer")
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002", after=2)
    pbx.called("PJSIP/1002", "PJSIP/1002-00000003")
    pbx.connect("PJSIP/1001", "PJSIP/1001-00000002", hold="7", after=9)
    assert pbx.brief()[1:] == [("routed", "1001", "", ""), ("answered", "1001", "", "")]
    # the routed event is timed join + HoldTime, so the hub's wait is Asterisk's HoldTime
    assert pbx.ats[1:] == ["2026-01-05T09:00:07.000Z", "2026-01-05T09:00:07.000Z"]


def test_row_ring_no_answer_then_rung_again_is_recalled() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.ev(
        "AgentRingNoAnswer", Uniqueid=CALL, Linkedid=CALL, Queue="support", Interface="PJSIP/1001"
    )
    pbx.called("PJSIP/1001", "PJSIP/1001-00000004")
    assert pbx.brief()[1:] == [("routed", "1001", "", ""), ("recalled", "1001", "", "")]


def test_row_direct_call_dial_is_routed_and_dial_end_answer_is_answered() -> None:
    pbx = Pbx()
    pbx.inbound()
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/trunk-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        CallerIDNum="+4930123",
        DestChannel="PJSIP/1001-00000002",
        DestLinkedid=CALL,
    )
    pbx.ev(
        "DialEnd",
        Channel="PJSIP/trunk-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        DestChannel="PJSIP/1001-00000002",
        DialStatus="ANSWER",
    )
    assert pbx.brief() == [("routed", "1001", "", ""), ("answered", "1001", "", "")]
    assert pbx.out[0]["source"] == "+4930123" and pbx.out[0]["destination"] == "5551000"
    assert pbx.out[0]["media"] == "telephone" and "queue_name" not in pbx.out[0]


def answered_call(**config: Any) -> Pbx:
    pbx = queued_call(**config)
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.connect("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.out.clear()
    return pbx


def test_row_blind_transfer_into_a_queue_is_requeued_then_transferred_from_the_agent() -> None:
    pbx = answered_call()
    pbx.ev(
        "BlindTransfer",
        TransfererChannel="PJSIP/1001-00000002",
        TransfereeLinkedid=CALL,
        Extension="5552000",
        Result="Success",
    )
    pbx.join("billing")
    pbx.called("PJSIP/2001", "PJSIP/2001-00000005", queue="billing")
    assert pbx.brief() == [("requeued", "", "", ""), ("transferred", "2001", "1001", "")]
    assert pbx.out[0]["queue_name"] == "billing"
    assert pbx.out[0]["contact_data"] == {"CUSTOMER_ID": "C-42", "caller_name": "Ann Caller"}


def test_row_blind_transfer_to_an_extension_is_transferred_from_the_agent() -> None:
    pbx = answered_call()
    pbx.ev(
        "BlindTransfer",
        TransfererChannel="PJSIP/1001-00000002",
        TransfereeLinkedid=CALL,
        Extension="2001",
        Result="Success",
    )
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/trunk-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        DestChannel="PJSIP/2001-00000006",
    )
    pbx.ev(
        "DialEnd",
        Channel="PJSIP/trunk-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        DestChannel="PJSIP/2001-00000006",
        DialStatus="ANSWER",
    )
    assert pbx.brief() == [("transferred", "2001", "1001", ""), ("answered", "2001", "", "")]


def test_row_failed_blind_transfer_changes_nothing() -> None:
    pbx = answered_call()
    pbx.ev(
        "BlindTransfer",
        TransfererChannel="PJSIP/1001-00000002",
        TransfereeLinkedid=CALL,
        Extension="9",
        Result="Fail",
    )
    assert pbx.out == []


def test_row_hold_and_a_new_leg_is_consulted_from_the_agent() -> None:
    pbx = answered_call()
    pbx.ev("Hold", Channel="PJSIP/1001-00000002", Uniqueid="u2", Linkedid=CALL)
    pbx.ev(
        "Newchannel",
        Channel="PJSIP/3001-00000007",
        Uniqueid="u7",
        Linkedid=CALL,
        Context="from-internal",
        Exten="3001",
    )
    assert pbx.brief() == [("consulted", "3001", "1001", "")]


def test_row_dial_from_the_agent_leg_is_consulted() -> None:
    pbx = answered_call()
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/1001-00000002",
        Uniqueid="u2",
        Linkedid=CALL,
        DestChannel="PJSIP/3001-00000007",
    )
    assert pbx.brief() == [("consulted", "3001", "1001", "")]


def test_row_attended_transfer_after_a_consultation_moves_the_call_without_a_second_pop() -> None:
    pbx = answered_call()
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/1001-00000002",
        Uniqueid="u2",
        Linkedid=CALL,
        DestChannel="PJSIP/3001-00000007",
    )
    pbx.ev(
        "AttendedTransfer",
        Result="Success",
        OrigTransfererChannel="PJSIP/1001-00000002",
        TransferTargetChannel="PJSIP/3001-00000007",
        TransfereeLinkedid=CALL,
        DestType="Bridge",
    )
    assert pbx.brief() == [("consulted", "3001", "1001", ""), ("answered", "3001", "", "")]


def test_row_attended_transfer_without_a_consultation_seen_is_transferred() -> None:
    pbx = answered_call()
    pbx.ev(
        "AttendedTransfer",
        Result="Success",
        OrigTransfererChannel="PJSIP/1001-00000002",
        TransferTargetChannel="PJSIP/3001-00000009",
        TransfereeLinkedid=CALL,
        DestType="Bridge",
    )
    assert pbx.brief() == [("transferred", "3001", "1001", ""), ("answered", "3001", "", "")]


def test_row_pickup_is_picked_up_by_the_picker() -> None:
    pbx = queued_call(pop_on="answer")
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.ev(
        "Pickup",
        Channel="PJSIP/1004-00000008",
        Uniqueid="u8",
        Linkedid="u8",
        TargetChannel="PJSIP/1001-00000002",
        TargetLinkedid=CALL,
    )
    pbx.connect("PJSIP/1001", "PJSIP/1004-00000008")
    assert pbx.brief()[1:] == [("picked_up", "1004", "", ""), ("answered", "1004", "", "")]


def test_row_abandon_then_another_queue_is_redirected_from_the_first_queue() -> None:
    pbx = queued_call()
    pbx.ev("QueueCallerAbandon", Uniqueid=CALL, Linkedid=CALL, Queue="support", HoldTime="5")
    pbx.ev("QueueCallerLeave", Uniqueid=CALL, Linkedid=CALL, Queue="support")
    pbx.join("billing")
    pbx.called("PJSIP/2001", "PJSIP/2001-00000005", queue="billing")
    assert pbx.brief()[1:] == [("queued", "", "", ""), ("redirected", "2001", "", "support")]
    assert pbx.out[1]["queue_name"] == "billing" and "media" not in pbx.out[1]


def test_row_leave_then_another_queue_is_an_overflow_routed_as_usual() -> None:
    pbx = queued_call()
    pbx.ev("QueueCallerLeave", Uniqueid=CALL, Linkedid=CALL, Queue="support")
    pbx.join("overflow")
    pbx.called("PJSIP/2001", "PJSIP/2001-00000005", queue="overflow")
    assert pbx.brief()[1:] == [("queued", "", "", ""), ("routed", "2001", "", "")]


def test_row_last_channel_hangup_is_ended_and_abandoned_calls_end_too() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.ev(
        "Newchannel",
        Channel="PJSIP/1001-00000002",
        Uniqueid="u2",
        Linkedid=CALL,
        Context="from-internal",
        Exten="1001",
    )
    pbx.hangup("PJSIP/1001-00000002", "u2")
    assert pbx.brief()[-1] == ("routed", "1001", "", "")  # a channel left, not the call
    pbx.ev("QueueCallerAbandon", Uniqueid=CALL, Linkedid=CALL, Queue="support", HoldTime="12")
    pbx.hangup("PJSIP/trunk-00000001", CALL)
    assert pbx.brief()[-1] == ("ended", "", "", "")
    assert pbx.mapper.calls == {} and pbx.mapper.legs == {}


def test_row_variables_with_the_prefix_and_the_user_event_give_description_dnid_and_data() -> None:
    pbx = Pbx(data_keys={"CustomerId": "CUSTOMER_ID"})
    pbx.channel("PJSIP/trunk-00000001", CALL, exten="s")  # FreePBX: DID not in Exten
    for name, value in (
        ("__SPOP_DESCRIPTION", "Order"),
        ("_SPOP_DNID", "0800123"),
        ("SPOP_TIER", "gold"),
        ("OTHER", "x"),
    ):
        pbx.ev("VarSet", Uniqueid=CALL, Linkedid=CALL, Variable=name, Value=value)
    pbx.ev(
        "UserEvent",
        Uniqueid=CALL,
        Linkedid=CALL,
        UserEvent="SpopData",
        CustomerId="C-7",
        Channel="PJSIP/trunk-00000001",
        Privilege="user,all",
    )
    pbx.ev("UserEvent", Uniqueid=CALL, Linkedid=CALL, UserEvent="SomethingElse", Foo="bar")
    pbx.join()
    queued = pbx.out[0]
    assert (queued["contact_description"], queued["destination"]) == ("Order", "0800123")
    assert queued["contact_data"] == {
        "TIER": "gold",
        "CUSTOMER_ID": "C-7",
        "caller_name": "Ann Caller",
    }


def test_row_data_set_after_the_pop_rides_on_the_next_event() -> None:
    pbx = queued_call()
    pbx.ev("VarSet", Uniqueid=CALL, Linkedid=CALL, Variable="__SPOP_TICKET", Value="T-9")
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    assert pbx.out[1]["contact_data"] == {
        "CUSTOMER_ID": "C-42",
        "TICKET": "T-9",
        "caller_name": "Ann Caller",
    }
    pbx.connect("PJSIP/1001", "PJSIP/1001-00000002")
    assert "contact_data" not in pbx.out[2]  # unchanged: not sent again


def test_row_caller_name_key_can_be_left_out() -> None:
    pbx = queued_call(caller_name_key="")
    assert pbx.out[0]["contact_data"] == {"CUSTOMER_ID": "C-42"}


# -- the field reports (issue 11, item 4) -------------------------------------------------------------
def test_report_a_call_through_a_queue_pops_like_a_direct_one() -> None:
    """ "No pop when the call comes through a queue": FreePBX rings Local/1001@from-queue members,
    whose own leg then dials the phone; the agent is popped once, by the member, not the phone."""
    pbx = queued_call()
    pbx.called("Local/1001@from-queue/n", "Local/1001@from-queue-00000003;1")
    pbx.ev(
        "DialBegin",
        Channel="Local/1001@from-queue-00000003;2",
        Uniqueid="u4",
        Linkedid=CALL,
        DestChannel="PJSIP/1001-00000005",
    )
    assert pbx.brief()[1:] == [("routed", "1001", "", "")]


def test_report_several_devices_of_one_extension_pop_once_and_do_not_vanish() -> None:
    """One extension, two registered phones: one pop; the phone that stops ringing ends nothing."""
    pbx = queued_call()
    pbx.called("Local/1001@from-queue/n", "Local/1001@from-queue-00000003;1")
    pbx.called("PJSIP/1001", "PJSIP/1001-00000006")  # the same agent as a second member
    for uid, dest in (("u5", "PJSIP/1001-00000005"), ("u6", "PJSIP/1001-00000006")):
        pbx.ev(
            "Newchannel",
            Channel=dest,
            Uniqueid=uid,
            Linkedid=CALL,
            Context="from-internal",
            Exten="1001",
        )
        pbx.ev(
            "DialBegin",
            Channel="Local/1001@from-queue-00000003;2",
            Uniqueid="u4",
            Linkedid=CALL,
            DestChannel=dest,
        )
    pbx.ev(
        "DialEnd",
        Channel="Local/1001@from-queue-00000003;2",
        Uniqueid="u4",
        Linkedid=CALL,
        DestChannel="PJSIP/1001-00000006",
        DialStatus="CANCEL",
    )
    pbx.hangup("PJSIP/1001-00000006", "u6")
    assert pbx.brief()[1:] == [("routed", "1001", "", "")]


def test_report_a_pop_does_not_stay_after_hang_up() -> None:
    """The call ends when its last channel hangs up, whatever the order, and once."""
    pbx = queued_call()
    pbx.ev(
        "Newchannel",
        Channel="PJSIP/1001-00000002",
        Uniqueid="u2",
        Linkedid=CALL,
        Context="from-internal",
        Exten="1001",
    )
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.hangup("PJSIP/trunk-00000001", CALL)
    pbx.ev("NewCallerid", Uniqueid=CALL, Linkedid=CALL)  # Asterisk sends some after the Hangup
    pbx.hangup("PJSIP/1001-00000002", "u2")
    pbx.hangup("PJSIP/1001-00000002", "u2")
    assert [e for e in pbx.brief() if e[0] == "ended"] == [("ended", "", "", "")]


def test_report_the_queue_name_is_on_every_queue_pop() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    assert pbx.out[0]["queue_name"] == "support"  # on the contact: every pop carries it
    pbx2 = Pbx()
    pbx2.inbound()
    pbx2.join()  # no VarSet before: still named by the queue event itself
    assert pbx2.out[0]["queue_name"] == "support"


@pytest.mark.parametrize(
    ("internal_calls", "expected"), [(False, []), (True, [("routed", "1002", "", "")])]
)
def test_report_internal_calls_pop_only_when_configured(
    internal_calls: bool, expected: list[Any]
) -> None:
    pbx = Pbx(internal_calls=internal_calls)
    pbx.channel("PJSIP/1001-00000001", CALL, context="from-internal", exten="1002", num="1001")
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/1001-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        DestChannel="PJSIP/1002-00000002",
    )
    assert pbx.brief() == expected


def test_inbound_contexts_empty_means_every_call_is_inbound() -> None:
    pbx = Pbx(inbound_contexts=())
    pbx.channel("PJSIP/1001-00000001", CALL, context="from-internal", exten="1002", num="1001")
    pbx.ev(
        "DialBegin",
        Channel="PJSIP/1001-00000001",
        Uniqueid=CALL,
        Linkedid=CALL,
        DestChannel="PJSIP/1002-00000002",
    )
    assert pbx.brief() == [("routed", "1002", "", "")]


# -- reconnects ------------------------------------------------------------------------------------
def test_resync_keeps_known_calls_ends_vanished_ones_and_learns_new_ones() -> None:
    pbx = queued_call()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    pbx.mapper.mark_stale()
    channels = [
        {
            "Channel": "PJSIP/trunk-00000001",
            "Uniqueid": CALL,
            "Linkedid": CALL,
            "Context": "from-pstn",
            "Application": "Queue",
        },
        # a call that came in while the link was down, answered by 1003 meanwhile
        *LEARNED,
        # and one still waiting in billing
        {
            "Channel": "PJSIP/trunk-0000000b",
            "Uniqueid": "8.1",
            "Linkedid": "8.1",
            "Context": "from-pstn",
            "Exten": "5553000",
            "CallerIDNum": "+332",
            "Application": "Queue",
        },
    ]
    entries = [
        {"Queue": "billing", "Channel": "PJSIP/trunk-0000000b", "Uniqueid": "8.1", "Wait": "30"}
    ]
    out = pbx.mapper.resync(channels, entries, T0 + timedelta(seconds=60))
    brief = [(e["contact_id"], e["event"], e.get("resource", "")) for e in out]
    assert brief == [("9.1", "routed", "1003"), ("9.1", "answered", "1003"), ("8.1", "queued", "")]
    assert out[2]["at"] == "2026-01-05T09:00:30.000Z"  # joined Wait seconds ago
    assert out[0]["source"] == "+331" and out[0]["destination"] == "5552000"
    # the first call goes on where it was: no second pop for 1001
    pbx.out.clear()
    pbx.called("PJSIP/1001", "PJSIP/1001-00000002")
    assert pbx.out == []
    # Asterisk restarted meanwhile: nothing is live, every call known ends
    pbx.mapper.mark_stale()
    ended = pbx.mapper.resync([], [], T0 + timedelta(seconds=90))
    assert sorted((e["contact_id"], e["event"]) for e in ended) == [
        ("1700000000.1", "ended"),
        ("8.1", "ended"),
        ("9.1", "ended"),
    ]


LEARNED = [  # a call in progress found at login: the caller's leg and 1003's, answered
    {
        "Channel": "PJSIP/trunk-00000009",
        "Uniqueid": "9.1",
        "Linkedid": "9.1",
        "Context": "from-pstn",
        "Exten": "5552000",
        "CallerIDNum": "+331",
        "Application": "Queue",
    },
    {
        "Channel": "PJSIP/1003-0000000a",
        "Uniqueid": "9.2",
        "Linkedid": "9.1",
        "Context": "from-internal",
        "Application": "AppQueue",
        "ChannelStateDesc": "Up",
    },
]


def hub_state(**values: Any) -> dict[str, Any]:
    """A contact as the hub's tracker gives it (`ContactTracker.state`), restored after a restart."""
    return {
        "contact_id": "9.1",
        "last_at": "2026-01-05T09:00:50+00:00",
        "segment_start": "2026-01-05T09:00:00+00:00",
        "answered_at": None,
        "holder": "",
        "ended_seen": None,
        "following": {},
        **values,
    }


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        # unknown to the hub too: popped where it is, as before
        (None, [("routed", "1003", "09:01:00"), ("answered", "1003", "09:01:00")]),
        # answered by 1003 before the restart: nothing to send
        (hub_state(holder="1003", answered_at="2026-01-05T09:00:40+00:00"), []),
        # popped at 1003, answered while the hub was down: its answer only
        (hub_state(holder="1003", following={"1003": "p1"}), [("answered", "1003", "09:01:00")]),
        # with 1001, transferred to 1003 meanwhile: 1003 is popped, then answers
        (
            hub_state(holder="1001", answered_at="2026-01-05T09:00:40+00:00"),
            [("routed", "1003", "09:01:00"), ("answered", "1003", "09:01:00")],
        ),
        # the hub's last event is later than this clock (Asterisk's ran ahead): timed after it
        (
            hub_state(last_at="2026-01-05T09:01:07+00:00", following={"1003": "p1"}),
            [("answered", "1003", "09:01:07")],
        ),
    ],
    ids=["unknown", "answered", "ringing", "moved", "clock-ahead"],
)
def test_a_call_the_restarted_hub_knows_is_not_popped_again(
    state: dict[str, Any] | None, expected: list[tuple[str, str, str]]
) -> None:
    """A hub restarted with its source inside: the new mapper knows no call, the hub's journal
    does (`known`); what Asterisk lists is compared with it."""
    mapper = AsteriskMapper(MapConfig())
    mapper.known = lambda contact_id: state if contact_id == "9.1" else None
    out = mapper.resync(LEARNED, [], T0 + timedelta(seconds=60))
    assert [(e["event"], e["resource"], e["at"][11:19]) for e in out] == expected
    if state is not None:
        assert all("media" not in e for e in out)  # the hub has the contact: no new one


def test_a_call_taken_up_from_the_hub_and_ended_is_not_taken_up_again() -> None:
    """After a restart a call is seeded from the hub's state as it is met; once its events end
    it, a late event of another of its channels (Local halves hang up one after the other)
    meets a call the mapper no longer has: a fresh one, not the hub's again (a second `ended`,
    refused by the hub as contact_ended)."""
    mapper = AsteriskMapper(MapConfig())
    mapper.known = lambda contact_id: hub_state() if contact_id == "9.1" else None
    channel = {"Linkedid": "9.1", "Channel": "PJSIP/trunk-00000001", "Context": "from-pstn"}
    out = mapper.feed({"Event": "Newexten", "Uniqueid": "9.1", **channel}, T0)
    out += mapper.feed({"Event": "Hangup", "Uniqueid": "9.1", **channel}, T0)
    late = {**channel, "Channel": "Local/1003@agents-00000002;2", "Uniqueid": "9.2"}
    out += mapper.feed({"Event": "Newexten", **late}, T0 + timedelta(seconds=1))
    out += mapper.feed({"Event": "Hangup", **late}, T0 + timedelta(seconds=1))
    assert [(e["contact_id"], e["event"]) for e in out] == [("9.1", "ended")]


def test_events_never_go_back_in_time_for_one_contact() -> None:
    pbx = Pbx()
    pbx.inbound()
    pbx.ev("QueueCallerJoin", after=10, Uniqueid=CALL, Linkedid=CALL, Queue="support")
    pbx.ev(
        "AgentCalled",
        after=-5,
        Uniqueid=CALL,
        Linkedid=CALL,
        Interface="PJSIP/1001",
        DestChannel="PJSIP/1001-00000002",
    )
    assert pbx.ats == ["2026-01-05T09:00:10.000Z", "2026-01-05T09:00:10.000Z"]


def test_values_over_the_hubs_limits_are_cut_to_them_not_sent_whole() -> None:
    """A 5,000-character variable made the hub refuse the `queued` (too_long), and every pop of
    the call came with empty fields: the mapper cuts to 4,096 (data) and 1,024 (text)."""
    from spop_cli.pops import normalize_pop

    pbx = Pbx()
    pbx.channel("PJSIP/trunk-00000001", CALL, num="+" + "4" * 2000)
    for name, value in (("__SPOP_NOTES", "n" * 5000), ("__SPOP_" + "K" * 5000, "v")):
        pbx.ev(
            "VarSet",
            Channel="PJSIP/trunk-00000001",
            Uniqueid=CALL,
            Linkedid=CALL,
            Variable=name,
            Value=value,
        )
    pbx.join("q" * 2000)
    [queued] = pbx.out
    assert len(queued["source"]) == 1024 and len(queued["queue_name"]) == 1024
    assert queued["contact_data"]["NOTES"] == "n" * 4096
    assert queued["contact_data"]["K" * 4096] == "v"
    # what the hub takes, as it would take it
    fields = {k: v for k, v in queued.items() if k not in ("contact_id", "event")}
    pop = normalize_pop({**fields, "resource": "1001"})
    assert pop["contact_data"]["NOTES"] == "n" * 4096
