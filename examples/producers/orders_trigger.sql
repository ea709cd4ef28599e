-- A trigger that enqueues a pgbus job for every new order, in the inserting transaction:
-- the job exists only if the order commits, and workers are woken on commit.
--
-- Needs a migrated database and the queue (`pgbus queue create orders`); then
--     psql -f examples/producers/orders_trigger.sql
--     psql -c "INSERT INTO orders (customer, total_cents) VALUES ('ada', 4200)"
-- and a worker of the `orders` queue receives {"order_id": 1, "customer": "ada",
-- "total_cents": 4200}.

CREATE TABLE IF NOT EXISTS orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer    text NOT NULL,
    total_cents bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION orders_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgbus.send(
        'orders',
        jsonb_build_object('order_id', NEW.id, 'customer', NEW.customer,
                           'total_cents', NEW.total_cents),
        -- A customer's orders are handled one at a time, in order.
        group_key => 'customer:' || NEW.customer,
        -- An order is enqueued once, however often this runs for it.
        unique_key => 'order:' || NEW.id,
        headers => jsonb_build_object('source', 'orders_trigger'));
    RETURN NULL;
END
$$;

-- A row trigger: each order gets its own job (pgbus.send_batch, from a statement trigger
-- over a transition table, sends a whole INSERT's rows at once when they share options).
-- Postgres folds the repeated wake-ups of one transaction into one.
DROP TRIGGER IF EXISTS orders_enqueue ON orders;
CREATE TRIGGER orders_enqueue AFTER INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_enqueue();
