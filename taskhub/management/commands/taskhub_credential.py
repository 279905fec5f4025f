"""``manage.py taskhub_credential create|update|list|disable|enable|rotate-key``: manage service credentials."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from taskhub.auth import generate_key, hash_key
from taskhub.models import Credential


class Command(BaseCommand):
    help = (
        "Create, update, list, disable credentials and rotate their keys. New keys are printed alone on the last line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="verb", required=True)
        create = sub.add_parser("create", help="create a credential and print its key")
        create.add_argument("name")
        create.add_argument("--sub", action="append", default=[], metavar="PATTERN", help="may subscribe to (repeat)")
        create.add_argument("--pub", action="append", default=[], metavar="PATTERN", help="may publish (repeat)")
        create.add_argument("--max-instances", type=int, default=1, help="live connections allowed (default 1)")
        create.add_argument("--key", help="use this key (at least 16 characters) instead of a generated one")
        create.add_argument("--description", default="")
        update = sub.add_parser(
            "update",
            help="change a credential's permissions, instance limit or description (connections made after use them)",
        )
        update.add_argument("name")
        # Each list given replaces the credential's; "--sub" alone empties it.
        for option, text in (("--sub", "may subscribe to"), ("--pub", "may publish")):
            update.add_argument(
                option, action="extend", nargs="*", metavar="PATTERN", help=f"{text}: replaces the list (repeat)"
            )
        update.add_argument("--max-instances", type=int, help="live connections allowed")
        update.add_argument("--description")
        sub.add_parser("list", help="list credentials")
        for verb, text in (
            ("disable", "disable a credential (its instances are disconnected)"),
            ("enable", "enable a disabled credential"),
            ("rotate-key", "give a credential a new key and print it"),
        ):
            p = sub.add_parser(verb, help=text)
            p.add_argument("name")
            if verb == "rotate-key":
                p.add_argument("--key", help="use this key instead of a generated one")

    def handle(self, *args: Any, verb: str, **options: Any) -> None:
        if verb == "list":
            for c in Credential.objects.all():
                state = "active" if c.is_active else "disabled"
                self.stdout.write(
                    f"{c.name}\t{state}\tmax_instances={c.max_instances}\t"
                    f"sub={','.join(c.sub_permissions) or '-'}\tpub={','.join(c.pub_permissions) or '-'}"
                )
            return
        if verb == "create":
            key = options["key"] or generate_key()
            credential = Credential(
                name=options["name"],
                sub_permissions=options["sub"],
                pub_permissions=options["pub"],
                max_instances=options["max_instances"],
                description=options["description"],
            )
            self._save(credential, key, exclude_unique=False)
            self.stdout.write(f"Created credential {credential.name}. Its key (shown once):")
            self.stdout.write(key)
            return
        try:
            credential = Credential.objects.get(name=options["name"])
        except Credential.DoesNotExist:
            raise CommandError(f"no credential named {options['name']!r}") from None
        if verb == "update":
            self._update(credential, options)
        elif verb in ("disable", "enable"):
            credential.is_active = verb == "enable"
            credential.save(update_fields=["is_active", "updated_at"])
            self.stdout.write(f"{verb.capitalize()}d {credential.name}.")
        else:
            key = options["key"] or generate_key()
            self._save(credential, key, exclude_unique=True)
            self.stdout.write(f"New key of {credential.name} (shown once):")
            self.stdout.write(key)

    def _update(self, credential: Credential, options: dict[str, Any]) -> None:
        """Set what ``options`` gives; the rest of the credential stays as it is.

        Raises:
            CommandError: nothing to change, or a pattern or the limit is invalid.
        """
        changes = {
            "sub_permissions": options["sub"],
            "pub_permissions": options["pub"],
            "max_instances": options["max_instances"],
            "description": options["description"],
        }
        changes = {field: value for field, value in changes.items() if value is not None}
        if not changes:
            raise CommandError("nothing to update: give --sub, --pub, --max-instances or --description")
        for field, value in changes.items():
            setattr(credential, field, value)
        try:
            credential.full_clean(validate_unique=False)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        credential.save(update_fields=[*changes, "updated_at"])
        self.stdout.write(
            f"Updated {credential.name}: max_instances={credential.max_instances}\t"
            f"sub={','.join(credential.sub_permissions) or '-'}\tpub={','.join(credential.pub_permissions) or '-'}"
        )

    def _save(self, credential: Credential, key: str, *, exclude_unique: bool) -> None:
        try:
            credential.key_hash = hash_key(key)
            credential.full_clean(validate_unique=not exclude_unique)
        except (ValueError, ValidationError) as exc:
            messages = exc.messages if isinstance(exc, ValidationError) else [str(exc)]
            raise CommandError("; ".join(messages)) from None
        credential.save()
