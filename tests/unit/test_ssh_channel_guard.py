"""Reading the message number and channel of outgoing SSH messages."""

from __future__ import annotations

import paramiko
from paramiko.common import cMSG_CHANNEL_CLOSE, cMSG_CHANNEL_DATA, cMSG_GLOBAL_REQUEST

from lazycluster.transport.ssh_channel_guard import message_header


def test_channel_data_names_its_channel():
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_DATA)
    message.add_int(70_000)
    message.add_string(b"x" * 300_000)
    assert message_header(message) == (94, 70_000)

    # Reading the header must leave the message intact and growable.
    message.add_int(1)
    assert len(message.asbytes()) == 1 + 4 + 4 + 300_000 + 4


def test_close_names_its_channel():
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_CLOSE)
    message.add_int(3)
    assert message_header(message) == (97, 3)


def test_messages_outside_channels_have_no_channel():
    message = paramiko.Message()
    message.add_byte(cMSG_GLOBAL_REQUEST)
    message.add_string("keepalive@openssh.com")
    assert message_header(message) == (80, None)
    assert message_header(paramiko.Message()) == (-1, None)
    assert message_header(b"not a message") == (-1, None)
